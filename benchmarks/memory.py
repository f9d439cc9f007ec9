"""Peak memory of one training step (issue #4, benchmark 7): TinyLoRA vs PEFT LoRA r=1 vs full.

Each method runs in its own fresh process (peak RSS is per process): build a random-weight model of
Qwen2.5-0.5B's shape in fp32, one forward+backward on --batch x --seq tokens and one AdamW step.
Reported: RSS after building the model, and the peak (ru_maxrss) after the step.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch
from common import random_model, table

from tinylora import AdapterConfig, attach
from tinylora.config import DEFAULT_TARGETS


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_step(method: str, batch: int, seq: int) -> dict:
    model = random_model()
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method == "tinylora":
        params = attach(model, AdapterConfig(u=1, n_tie=1), progress=False, use_cache=False).trainable_parameters()
    elif method == "lora-r1":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, target_modules=list(DEFAULT_TARGETS)))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
    after_load = rss_mb()
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(params, lr=1e-4)
    model(input_ids=ids).logits.float().mean().backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "trainable": sum(p.numel() for p in params), "after_load_mb": after_load,
            "peak_mb": peak}


def bench_memory(args) -> None:
    if args.method:  # the child
        print(json.dumps(one_step(args.method, args.batch, args.seq)))
        return
    rows, res = [], {}
    for method in ("tinylora", "lora-r1", "full"):
        out = subprocess.run([sys.executable, sys.argv[0], "memory", "--method", method, "--batch", str(args.batch),
                              "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res[method] = r
        rows.append([method, f"{r['trainable']:,}", f"{r['after_load_mb']:,.0f}", f"{r['peak_mb']:,.0f}",
                     f"{r['peak_mb'] - r['after_load_mb']:,.0f}"])
    print(f"one training step, {args.batch}x{args.seq} tokens, fp32, random weights of Qwen2.5-0.5B's shape\n")
    table(["method", "trainable", "RSS after load (MB)", "peak RSS (MB)", "step adds (MB)"], rows)
    print(f"\npeak RSS ratio: tinylora / LoRA r=1 {res['tinylora']['peak_mb'] / res['lora-r1']['peak_mb']:.2f}, "
          f"tinylora / full {res['tinylora']['peak_mb'] / res['full']['peak_mb']:.2f}")
