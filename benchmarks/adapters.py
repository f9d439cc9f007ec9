"""Adapter costs (issue #4, benchmarks 3, 4, 6): compute overhead, file size, many adapters at once."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from pathlib import Path

import torch
from common import interleaved_times, median_time, paired_ratio, random_model, table

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.config import DEFAULT_TARGETS
from tinylora.generation import weights as cpu_weights

TARGETS = list(DEFAULT_TARGETS)


def bench_overhead(args) -> None:
    model = random_model(layers=args.layers)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=gen)
    prompt = torch.randint(0, 1000, (args.gen_batch, 16), generator=gen)
    # the fast weight copies generation can run on: packed fp32 (the default for rollouts) and int8
    copies = {name: kind(model) for name, kind, ok in (
        ("packed fp32", cpu_weights.PackedWeights, cpu_weights.packed_available()),
        ("int8", cpu_weights.Int8Weights, cpu_weights.int8_available())) if ok}
    adapter = attach(model, AdapterConfig(u=1, n_tie=1), progress=False)
    with torch.no_grad():
        adapter.v.normal_(0, 0.05, generator=gen)
    off = adapter.disabled  # the base model: hooks return at once, weights untouched

    # training: the same backward through every layer; the base sends it to the input embeddings instead of v
    def train_step():
        adapter.v.grad = None
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(not adapter.enabled)
        model(inputs_embeds=emb).logits.float().mean().backward()

    train = interleaved_times({"frozen": off, "adapter": contextlib.nullcontext}, train_step, args.reps)

    def generate():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)

    setups = {"base fp32": off, "tinylora merged into fp32": adapter.merged_weights}
    for name, weights in copies.items():
        setups[f"{name} base"] = lambda w=weights: _both(off(), w.active())
        setups[f"{name} base + tinylora hooks ({name} rollouts)"] = weights.active
    gen_times = interleaved_times(setups, generate, args.reps)

    med = {k: statistics.median(v) for k, v in {**train, **gen_times}.items()}
    rows = [[f"training fwd+bwd, {args.batch}x{args.seq} tokens", "frozen weights (grad to input embeddings)",
             f"{med['frozen']:.3f}"],
            ["", f"tinylora unmerged (grad to v, {adapter.num_trainable()} numbers)", f"{med['adapter']:.3f}"]]
    for i, name in enumerate(setups):
        rows.append([f"greedy generate, {args.gen_batch} rows x {args.new_tokens} tokens" if i == 0 else "",
                     name, f"{med[name]:.3f}"])
    print(f"random weights of Qwen2.5-0.5B's shape, {args.layers} layers, variants interleaved, "
          f"median of {args.reps}\n")
    table(["workload", "weights", "seconds"], rows)
    hooks = "".join(f", {name} with hooks: "
                    f"{paired_ratio(gen_times, f'{name} base + tinylora hooks ({name} rollouts)', f'{name} base'):.3f}"
                    for name in copies)
    print(f"\noverhead, median of paired ratios: training (adapter / frozen) "
          f"{paired_ratio(train, 'adapter', 'frozen'):.3f}; generation merged "
          f"{paired_ratio(gen_times, 'tinylora merged into fp32', 'base fp32'):.3f}{hooks}")


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


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
                                    TinyLoraConfig(r=2, u=1, weight_tying=1 - n / n_modules, target_modules=TARGETS))
        peft_n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        peft_model.save_pretrained(Path(d) / "peft")
        theirs = sum(f.stat().st_size for f in (Path(d) / "peft").iterdir() if f.suffix == ".safetensors")
    table([f"adapter ({n_modules} modules)", "trainable", "file bytes"],
          [["tinylora (ours)", n, f"{ours:,}"], ["PEFT tinylora", peft_n, f"{theirs:,}"]])
    print(f"\nsize ratio (PEFT / ours): {theirs / ours:,.0f}x")


def bench_bank(args) -> None:
    """64 rows through our AdapterBank (one batch) vs PEFT, which runs one adapter at a time."""
    from peft import PeftModel, TinyLoraConfig, get_peft_model

    from tinylora.generation.bank import AdapterBank
    rows_n, new = 64, args.new_tokens
    model = random_model(layers=args.layers)
    ids = torch.randint(0, 1000, (rows_n, 16), generator=torch.Generator().manual_seed(0))

    def gen(m, x):
        m.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    results = {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        adapter = attach(model, AdapterConfig(u=1, n_tie=16), progress=False)
        paths = []
        for k in range(1000):
            adapter.v.copy_(torch.randn(adapter.v.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
            paths.append(save_adapter(adapter, Path(d) / f"a{k}.safetensors"))
        adapter.detach()
        bank = AdapterBank(model, paths)
        for distinct in (1, 16, 1000):
            which = [(b * 997) % distinct for b in range(rows_n)] if distinct < 1000 else \
                torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:rows_n].tolist()

            def run(which=which):
                with bank.rows(which):
                    gen(model, ids)
            results[f"tinylora AdapterBank, {distinct} distinct adapters, one batch"] = median_time(run, args.reps)
        bank.adapter.detach()

        # PEFT: the same u, tying and module count; rows that use different adapters cannot share a batch
        peft_model = get_peft_model(model, TinyLoraConfig(r=2, u=1, weight_tying=15 / 16, target_modules=TARGETS))
        for k in range(1, args.peft_adapters):
            peft_model.add_adapter(f"a{k}", TinyLoraConfig(r=2, u=1, weight_tying=15 / 16, target_modules=TARGETS))
        names = ["default"] + [f"a{k}" for k in range(1, args.peft_adapters)]
        assert isinstance(peft_model, PeftModel)

        def peft_one():
            peft_model.set_adapter("default")
            gen(peft_model, ids)

        def peft_grouped(groups):
            def run():
                for g, rows in enumerate(ids.chunk(groups)):
                    peft_model.set_adapter(names[g % len(names)])
                    gen(peft_model, rows)
            return run
        results["PEFT tinylora, 1 adapter, one batch"] = median_time(peft_one, args.reps)
        results[f"PEFT, 16 batches of 4 rows ({args.peft_adapters} adapters in turn), set_adapter between"] = \
            median_time(peft_grouped(16), args.reps)
        results[f"PEFT, 64 requests of 1 row ({args.peft_adapters} adapters in turn), set_adapter between"] = \
            median_time(peft_grouped(64), args.reps)
    print(f"{rows_n} rows x {new} new tokens (greedy), random weights of Qwen2.5-0.5B's shape, {args.layers} "
          f"layers, median of {args.reps}\n")
    table(["setting", "seconds", "tokens/s"], [[k, f"{t:.2f}", f"{rows_n * new / t:.1f}"] for k, t in results.items()])
    keys = list(results)
    one, many, peft64 = results[keys[0]], results[keys[2]], results[keys[-1]]
    print(f"\nthroughput ratio (1000 adapters / 1 adapter): {one / many:.3f}; "
          f"ours with 1000 adapters vs PEFT per-request switching: {peft64 / many:.1f}x")
