"""`bench.py long`: how a decode step's cost grows with the context, the engine's KV cache against transformers'.

16 rows (`--gen-batch`), greedy, end of sequence ignored, `--new-tokens` (default 1,600) new tokens each after
64-token prompts, on a random-weight model of the default model's shape, through `Engine.step()`. Two caches,
side by side in one run: the engine's (buffers allocated ahead, a step writes one column) and transformers'
DynamicCache as the engine used it before (every step concatenates: the whole cache copied); `--engine-only`:
the engine's alone (e.g. to 4,096 tokens). Reported: the
median step time around 100, 750, 1,550 and 4,096 tokens of context (those the run reaches), the ratio of the
last to the first, and decode tokens/s over the run.

With `--peer llama-batched-bench`, the same workload on the embedded default instead of random weights, and
llama.cpp's `llama-batched-bench` on that model's F32 GGUF (`llama_cpp.py`: the same dequantized weights) with
as many threads: 16 parallel sequences, the same prompt and new-token lengths; its decode tok/s (S_TG)
against the engine's, `--reps` rounds of each in ABBA order (medians, and the ratio per round).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import statistics
import subprocess
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
    if args.peer:
        from tinylora.models import load_model
        model, _ = load_model(args.model, "fp32", "cpu")
    else:
        model = random_model(layers=args.layers)
    tok = tiny_tokenizer()  # pad/eos ids only: prompts are random ids and end of sequence is ignored
    prompts = torch.randint(1000, 100_000, (rows, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    caches = (("engine KV buffers (in place)", None),
              ("transformers DynamicCache (concatenation)", lambda cache: cache))
    peer_name = "llama.cpp llama-batched-bench (F32 GGUF)"

    def ours(runs: dict) -> None:
        for name, patch in caches[:1] if args.engine_only else caches:
            engine = Engine(model, tok, weights="auto", max_batch=rows)
            with mock.patch.object(engine_module, "in_slots", patch) if patch else contextlib.nullcontext():
                runs[name].append(step_times(engine, prompts, new))

    def peer(runs: dict) -> None:
        runs[peer_name].append(llama_batched_bench(args.model, rows, new))

    # with a peer, `--reps` rounds in ABBA order, so that the machine's drift hits both sides alike
    runs = collections.defaultdict(list)
    for k in range(args.reps if args.peer else 1):
        for side in ((ours, peer) if k % 2 == 0 else (peer, ours)) if args.peer else (ours,):
            side(runs)
    contexts = [c for c in (100, 750, 1550, 4096) if c - PROMPT < new]
    weights = args.model if args.peer else f"random weights of the default model's shape ({args.layers} layers)"
    rounds = f"; medians over {args.reps} rounds" if args.peer else ""
    print(f"\n{weights}, fp32 on cpu, {torch.get_num_threads()} threads; {rows} rows, "
          f"{PROMPT}-token prompts, {new} new tokens, greedy, end of sequence ignored; median step (ms) around each "
          f"context{rounds}\n")
    tok_s = {name: [t if isinstance(t, float) else rows * len(t) / sum(t) for t in ts] for name, ts in runs.items()}
    step = {name: {c: statistics.median(around(t, c) for t in ts) for c in contexts}
            for name, ts in runs.items() if name != peer_name}
    table(["KV cache", *[f"step @ {c}" for c in contexts], f"@ {contexts[-1]} / @ {contexts[0]}", "decode tok/s"],
          [[name, *[f"{1e3 * step[name][c]:.0f}" for c in contexts],
            f"{step[name][contexts[-1]] / step[name][contexts[0]]:.2f}x", f"{statistics.median(tok_s[name]):.0f}"]
           if name in step else [name, *["–"] * len(contexts), "–", f"{statistics.median(tok_s[name]):.0f}"]
           for name in runs])
    ours_rate = tok_s["engine KV buffers (in place)"]
    before = tok_s.get("transformers DynamicCache (concatenation)")
    if before:
        ratios = [a / b for a, b in zip(ours_rate, before)]
        print(f"\nengine buffers vs DynamicCache: {statistics.median(ratios):.2f}x the decode throughput")
    if args.peer:
        ratios = [a / b for a, b in zip(ours_rate, tok_s[peer_name])]
        print(f"engine vs llama-batched-bench: {statistics.median(ratios):.2f}x the decode throughput "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")


def llama_batched_bench(model: str, rows: int, new: int) -> float:
    """llama.cpp's decode tokens/s (S_TG) for `rows` sequences of PROMPT + `new` tokens, on as many threads."""
    from llama_cpp import binaries, model_gguf
    gguf = model_gguf(model)
    threads = str(torch.get_num_threads())
    cmd = [str(binaries() / "llama-batched-bench"), "-m", str(gguf), "-c", str(rows * (PROMPT + new) + 256),
           "-b", "2048", "-ub", "512", "-npp", str(PROMPT), "-ntg", str(new), "-npl", str(rows),
           "-t", threads, "-tb", threads, "--load-mode", "none"]  # weights read into its own memory, as the engine's
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    # the results table: |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s | ...
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0]) and int(cells[2]) == rows:
            return float(cells[7])
    raise RuntimeError(f"no result row in llama-batched-bench's output:\n{out}")
