"""`bench.py long`: how a decode step's cost grows with the context, the engine's KV cache against transformers'.

16 rows (`--gen-batch`), greedy, end of sequence ignored, `--new-tokens` (default 1,600) new tokens each after
64-token prompts, on a random-weight model of the default model's shape, through `Engine.step()`. Two caches,
side by side in one run: the engine's (buffers allocated ahead, a step writes one column) and transformers'
DynamicCache as the engine used it before (every step concatenates: the whole cache copied). Reported: the
median step time around 100, 750 and 1,550 tokens of context, the ratio of the last to the first, and
decode tokens/s over the run.
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import torch
from common import random_model, table

from tinylora.generation import engine as engine_module
from tinylora.generation.engine import Engine, Sampling
from tinylora.testing import tiny_tokenizer

PROMPT = 64


def step_times(engine: Engine, prompts: list[list[int]], new: int) -> list[float]:
    """Seconds of every step after the first (which admits and prefills)."""
    with engine.generating():
        for p in prompts:
            engine.add(p, Sampling(max_new_tokens=new, temperature=0, ignore_eos=True))
        engine.step()
        times = []
        while not engine.idle:
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    return times


def around(times: list[float], context: int) -> float:
    """Median step time over the 21 steps around `context` tokens of context (prompt + generated)."""
    i = max(0, min(len(times) - 1, context - PROMPT))
    window = sorted(times[max(0, i - 10):i + 11])
    return window[len(window) // 2]


def bench_long(args) -> None:
    rows = args.gen_batch if args.gen_batch != 32 else 16  # this benchmark's default: 16 rows
    new = args.new_tokens if args.new_tokens != 48 else 1600
    model = random_model(layers=args.layers)
    tok = tiny_tokenizer()  # pad/eos ids only: prompts are random ids and end of sequence is ignored
    prompts = torch.randint(1000, 100_000, (rows, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    results = {}
    for name, patch in (("engine KV buffers (in place)", None),
                        ("transformers DynamicCache (concatenation)", lambda cache: cache)):
        engine = Engine(model, tok, weights="auto", max_batch=rows)
        with mock.patch.object(engine_module, "in_slots", patch) if patch else contextlib.nullcontext():
            times = step_times(engine, prompts, new)
        results[name] = times
    contexts = [c for c in (100, 750, 1550) if c - PROMPT < new]
    print(f"\nrandom weights of the default model's shape ({args.layers} layers), fp32 on cpu; {rows} rows, "
          f"{PROMPT}-token prompts, {new} new tokens, greedy, end of sequence ignored; median step (ms) around each "
          "context\n")
    table(["KV cache", *[f"step @ {c}" for c in contexts], f"@ {contexts[-1]} / @ {contexts[0]}", "decode tok/s"],
          [[name, *[f"{1e3 * around(t, c):.0f}" for c in contexts],
            f"{around(t, contexts[-1]) / around(t, contexts[0]):.2f}x", f"{rows * len(t) / sum(t):.0f}"]
           for name, t in results.items()])
    a, b = (sum(t) for t in results.values())
    print(f"\nengine buffers vs DynamicCache: {b / a:.2f}x the decode throughput")
