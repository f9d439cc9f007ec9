"""Rollout throughput against the machine's ceiling (issue #4, benchmark 2).

ceiling tokens/s = peak fp32 matmul GFLOP/s (measured now) / GFLOP per generated token, where a token
costs 2·(weights of every linear layer, lm_head included) + 4·layers·q_dim·context for attention.
Three rollout weights: plain fp32 (merged), fp32 pre-packed for oneDNN (the default) and int8; int8 is
also reported against the same bound at fbgemm's int8 peak, which is higher.
Measured: our sampler (the trainer's rollout engine) at the GRPO batch, B prompts × G samples, on a
random-weight model of the default's shape (random weights never stop early, so every row runs the
full length: a steady batch) and, if the default model is available, on the real GRPO rollout
(real prompts, rows stop at end-of-sequence, as in training).
"""

from __future__ import annotations

import functools
import time

import torch
from common import int8_gflops, matmul_gflops, packed_gflops, random_model, table

from tinylora import AdapterConfig, attach
from tinylora.generation import weights as cpu_weights
from tinylora.generation.engine import sample
from tinylora.tasks.prompts import chat_prompts


def flops_per_token(model, context: int) -> float:
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    q_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return 2 * linear + 4 * cfg.num_hidden_layers * q_dim * context


def timed_rollout(model, tok, prompts, args, context) -> tuple[float, int]:
    """(seconds, generated tokens) of one sample() call under context(), median over reps by seconds."""
    runs = []
    for rep in range(args.reps + 1):
        t = time.perf_counter()
        with context():
            ro = sample(model, tok, prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
                        seed=rep, repeats=args.group)
        runs.append((time.perf_counter() - t, int(ro.completion_mask.sum())))
    runs = sorted(runs[1:])  # first run is warm-up
    return runs[len(runs) // 2]


def bench_ceiling(args) -> None:
    from tinylora.models import load_model
    from tinylora.tasks import load_task
    n_rows = args.batch * args.group

    def peaks() -> tuple[float, float]:  # fp32 and int8 GFLOP/s, best of several square sizes
        return (max(matmul_gflops(n, n, n, reps=10) for n in (1024, 1536, 2048)),
                max(int8_gflops(n, n, n, reps=5) for n in (1024, 2048)))

    peak, int8_peak = peaks()
    decode = {"fp32": matmul_gflops(n_rows, 896, 4864, reps=20),
              "packed fp32": packed_gflops(n_rows, 896, 4864, reps=20),
              "int8": int8_gflops(n_rows, 896, 4864, reps=20)}
    print(f"matmul GFLOP/s: fp32 peak {peak:.0f}, int8 peak {int8_peak:.0f}; at the decode shape "
          f"[{n_rows}x896]·[896x4864]: " + ", ".join(f"{k} {v:.0f}" for k, v in decode.items()) + "\n")

    real, tok = load_model(args.model)  # also gives the tokenizer for the random model
    problems = load_task("arithmetic", split="train", n=args.batch, seed=0)
    prompts = chat_prompts(tok, [p.question for p in problems])
    P = len(tok(prompts[0], add_special_tokens=False).input_ids)
    fpt = flops_per_token(real, P + args.new_tokens // 2) / 1e9
    rows, results = [], {}
    cases = (("random weights (every row full length)", random_model(), False),
             ("real model, GRPO rollout", real, False), ("real model + adapter, as in training", real, True))
    for label, model, with_adapter in cases:
        adapter = None
        if with_adapter:  # what the trainer runs: fp32 merges the adapter each rollout, copies run its hooks
            adapter = attach(model, AdapterConfig(), progress=False)
            with torch.no_grad():
                adapter.v.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        for wname, choice in (("fp32", "merged"), ("packed fp32", "packed"), ("int8", "int8")):
            weights = cpu_weights.for_generation(model, choice, exact=True)  # as the trainer
            context = functools.partial(weights.generating, adapter)
            sec, n_tok = timed_rollout(model, tok, prompts, args, context)
            tps = n_tok / sec
            results[(label, wname)] = tps
            rows.append([label, wname, n_tok, f"{sec:.1f}", f"{tps:.1f}"])
            del weights
    # the peak is measured again at the end and the higher one kept: a busy moment only lowers it
    again = peaks()
    print(f"peaks measured again after the rollouts: fp32 {again[0]:.0f}, int8 {again[1]:.0f} GFLOP/s; "
          "the higher of each pair is the ceiling")
    peak, int8_peak = max(peak, again[0]), max(int8_peak, again[1])
    ceiling, ceiling_int8 = peak / fpt, max(int8_peak, decode["int8"]) / fpt  # int8: the same bound, int8 rate
    rows = [row + [f"{results[row[0], row[1]] / ceiling:.2f}", f"{results[row[0], row[1]] / ceiling_int8:.2f}"]
            for row in rows]
    print(f"{args.batch} prompts x {args.group} samples, ~{P} prompt tokens, {args.new_tokens} new tokens, "
          f"T={args.temperature}; {fpt:.2f} GFLOP per generated token → ceiling {ceiling:.0f} tokens/s at the fp32 "
          f"peak, {ceiling_int8:.0f} tokens/s at the int8 peak\n")
    table(["model", "weights", "generated tokens", "seconds", "tokens/s", "/ fp32 ceiling", "/ int8 ceiling"], rows)
    full = {w: results[("random weights (every row full length)", w)] for w in ("fp32", "packed fp32", "int8")}
    print(f"\nrollout throughput / fp32 ceiling at the full batch: packed fp32 (the default) "
          f"{full['packed fp32'] / ceiling:.2f}, int8 {full['int8'] / ceiling:.2f} ({full['int8'] / ceiling_int8:.2f} "
          f"of the int8 one), plain fp32 {full['fp32'] / ceiling:.2f}; speed-up over plain fp32: packed "
          f"{full['packed fp32'] / full['fp32']:.2f}x, int8 {full['int8'] / full['fp32']:.2f}x")
