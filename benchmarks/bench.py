"""Side-by-side measurements on this machine; each prints a table and a final headline ratio.

    python benchmarks/bench.py overhead   # training fwd+bwd with the unmerged adapter vs frozen weights
    python benchmarks/bench.py size       # our adapter file vs PEFT's tinylora at equal trainable count
    python benchmarks/bench.py bank       # 64-row generation with 1, 16, 1000 distinct adapters

Models are random-weight models of Qwen2.5-0.5B's shape built from tinylora's offline catalogue:
throughput and file size do not depend on trained weights. Medians of --reps repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.count import resolve_config

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def random_model(name: str = MODEL, layers: int | None = None):
    config = resolve_config(name)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_overhead(args) -> None:
    model = random_model(layers=args.layers)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def frozen_step():  # the same backward through every layer, into the input embeddings instead of v
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=emb).logits.float().mean().backward()

    for p in model.parameters():
        p.requires_grad_(False)
    t_frozen = median_time(frozen_step, args.reps)
    adapter = attach(model, AdapterConfig(u=1, n_tie=16), progress=False)

    def adapter_step():
        adapter.v.grad = None
        model(input_ids=ids).logits.float().mean().backward()

    t_adapter = median_time(adapter_step, args.reps)
    print(f"| training fwd+bwd, {args.batch}x{args.seq} tokens, {args.layers} layers | seconds |")
    print(f"| frozen weights (grad to input embeddings) | {t_frozen:.3f} |")
    print(f"| tinylora unmerged (grad to v) | {t_adapter:.3f} |")
    print(f"overhead ratio (adapter / frozen): {t_adapter / t_frozen:.3f}")


def bench_size(args) -> None:
    from peft import TinyLoraConfig, get_peft_model
    model = random_model(layers=args.layers)
    adapter = attach(model, AdapterConfig(u=1, n_tie=16), progress=False)
    n = adapter.num_trainable()
    with tempfile.TemporaryDirectory() as d:
        ours = save_adapter(adapter, Path(d) / "a.safetensors").stat().st_size
        adapter.detach()
        n_modules = len(adapter.targets)
        peft_model = get_peft_model(model,  # detach() gave the plain model back
                                    TinyLoraConfig(r=2, u=1, weight_tying=1 - n / n_modules,
                                                   target_modules=list(AdapterConfig().targets)))
        peft_n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        peft_model.save_pretrained(Path(d) / "peft")
        theirs = sum(f.stat().st_size for f in (Path(d) / "peft").iterdir() if f.suffix == ".safetensors")
    print(f"| adapter ({n_modules} modules) | trainable | file bytes |")
    print(f"| tinylora (ours) | {n} | {ours:,} |")
    print(f"| PEFT tinylora | {peft_n} | {theirs:,} |")
    print(f"size ratio (PEFT / ours): {theirs / ours:,.0f}x")


def bench_bank(args) -> None:
    from tinylora.bank import AdapterBank
    model = random_model(layers=args.layers)
    with tempfile.TemporaryDirectory() as d:
        adapter = attach(model, AdapterConfig(u=1, n_tie=16), progress=False)
        paths = []
        for k in range(1000):
            with torch.no_grad():
                adapter.v.copy_(torch.randn(adapter.v.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
            paths.append(save_adapter(adapter, Path(d) / f"a{k}.safetensors"))
        adapter.detach()
        bank = AdapterBank(model, paths)
        ids = torch.randint(0, 1000, (64, 16), generator=torch.Generator().manual_seed(0))
        rows = {}
        for distinct in (1, 16, 1000):
            which = [(b * 997) % distinct for b in range(64)] if distinct < 1000 else \
                torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:64].tolist()

            def run():
                with bank.rows(which):
                    model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens,
                                   pad_token_id=0)
            rows[distinct] = 64 * args.new_tokens / median_time(run, args.reps)
    print(f"| 64 rows, {args.new_tokens} new tokens, {args.layers} layers | tokens/s |")
    for k, v in rows.items():
        print(f"| {k} distinct adapters | {v:.1f} |")
    print(f"throughput ratio (1000 adapters / 1 adapter): {rows[1000] / rows[1]:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["overhead", "size", "bank"])
    p.add_argument("--layers", type=int, default=24, help="transformer blocks (default: 24, the full 0.5B)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    {"overhead": bench_overhead, "size": bench_size, "bank": bench_bank}[args.which](args)


if __name__ == "__main__":
    main()
