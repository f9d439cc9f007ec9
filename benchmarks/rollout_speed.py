"""Rollout throughput against the machine's ceiling (issue #4, benchmark 2).

ceiling tokens/s = peak fp32 matmul GFLOP/s (measured now) / GFLOP per generated token, where a token
costs 2·(weights of every linear layer, lm_head included) + 4·layers·q_dim·context for attention.
int8 rollouts are also reported against the same bound at fbgemm's int8 peak, which is higher.
Measured: our sampler (the trainer's rollout engine) at the GRPO batch, B prompts × G samples, on a
random-weight model of the default's shape (random weights never stop early, so every row runs the
full length: a steady batch) and, if the default model is available, on the real GRPO rollout
(real prompts, rows stop at end-of-sequence, as in training).
"""

from __future__ import annotations

import contextlib
import time

import torch
from common import int8_gflops, matmul_gflops, random_model, table

from tinylora import int8
from tinylora.rollout import chat_prompts, sample


def flops_per_token(model, context: int) -> float:
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    q_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return 2 * linear + 4 * cfg.num_hidden_layers * q_dim * context


def timed_rollout(model, tok, prompts, args, weights=None) -> tuple[float, int]:
    """(seconds, generated tokens) of one sample() call, median over reps by seconds."""
    runs = []
    for rep in range(args.reps + 1):
        t = time.perf_counter()
        with weights.active() if weights is not None else contextlib.nullcontext():
            ro = sample(model, tok, prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
                        seed=rep, repeats=args.group)
        runs.append((time.perf_counter() - t, int(ro.completion_mask.sum())))
    runs = sorted(runs[1:])  # first run is warm-up
    return runs[len(runs) // 2]


def bench_ceiling(args) -> None:
    from tinylora.models import load_model
    from tinylora.tasks import load_task
    peak = max(matmul_gflops(n, n, n, reps=10) for n in (1024, 1536, 2048))
    n_rows = args.batch * args.group
    decode_fp32 = matmul_gflops(n_rows, 896, 4864, reps=20)
    int8_peak, decode_int8 = int8_gflops(2048, 2048, 2048, reps=5), int8_gflops(n_rows, 896, 4864, reps=20)
    print(f"matmul GFLOP/s: fp32 peak {peak:.0f}, fp32 at the decode shape [{n_rows}x896]·[896x4864] "
          f"{decode_fp32:.0f}; fbgemm int8 peak {int8_peak:.0f}, at the decode shape {decode_int8:.0f}\n")

    real, tok = load_model(args.model)  # also gives the tokenizer for the random model
    problems = load_task("arithmetic", split="train", n=args.batch, seed=0)
    prompts = chat_prompts(tok, [p.question for p in problems])
    P = len(tok(prompts[0], add_special_tokens=False).input_ids)
    fpt = flops_per_token(real, P + args.new_tokens // 2) / 1e9
    ceiling = peak / fpt
    ceiling_int8 = max(int8_peak, decode_int8) / fpt  # the same bound for int8 arithmetic
    rows, results = [], {}
    cases = (("random weights (every row full length)", random_model()), ("real model, GRPO rollout", real))
    for label, model in cases:
        for wname in ("fp32", "int8"):
            weights = int8.Int8Weights(model) if wname == "int8" else None
            sec, n_tok = timed_rollout(model, tok, prompts, args, weights)
            tps = n_tok / sec
            results[(label, wname)] = tps
            rows.append([label, wname, n_tok, f"{sec:.1f}", f"{tps:.1f}", f"{tps / ceiling:.2f}",
                         f"{tps / ceiling_int8:.2f}"])
            del weights
    print(f"{args.batch} prompts x {args.group} samples, ~{P} prompt tokens, {args.new_tokens} new tokens, "
          f"T={args.temperature}; {fpt:.2f} GFLOP per generated token → ceiling {ceiling:.0f} tokens/s at the fp32 "
          f"peak, {ceiling_int8:.0f} tokens/s at the int8 peak\n")
    table(["model", "weights", "generated tokens", "seconds", "tokens/s", "/ fp32 ceiling", "/ int8 ceiling"], rows)
    best = results[("random weights (every row full length)", "int8")]
    print(f"\nrollout throughput / ceiling (int8, full batch): {best / ceiling:.2f} of the fp32 ceiling, "
          f"{best / ceiling_int8:.2f} of the int8 one; "
          f"int8 / fp32 speed-up: {best / results[('random weights (every row full length)', 'fp32')]:.2f}x")
