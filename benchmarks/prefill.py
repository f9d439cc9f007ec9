"""`bench.py prefill`: the default task's first `--batch` chat prompts (28 to 51 tokens for 32) prefilled
together, as one batch padded to the longest prompt and in the engine's groups of similar length
(generation/kv.py: length_buckets)."""

from __future__ import annotations

import statistics
import time

import torch
from common import table

from tinylora.generation import kv
from tinylora.generation.engine import Engine
from tinylora.generation.sequence import Sampling
from tinylora.models import load_model
from tinylora.tasks.prompts import chat_prompts

ONE_BATCH = 10 ** 9  # a bucket cost no split can beat


def bench_prefill(args) -> None:
    from tinylora.api import DataConfig
    model, tok = load_model(args.model, "fp32", "cpu")
    prompts = chat_prompts(tok, [p.question for p in DataConfig().problems("test", args.batch)])
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    engine = Engine(model, tok, weights="packed", max_batch=len(ids))

    def prefill() -> float:  # one token each: the prefill and one decode-free pick
        for x in ids:
            engine.add(x, Sampling(max_new_tokens=1, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        while not engine.idle:
            engine.step()
        return time.perf_counter() - t

    lengths = [len(x) for x in ids]
    buckets = kv.length_buckets(lengths)
    setups = {"one batch, padded to the longest prompt": ONE_BATCH, "groups of similar length": kv.BUCKET_COST}
    computed = {ONE_BATCH: len(ids) * max(lengths),
                kv.BUCKET_COST: sum(len(b) * max(lengths[i] for i in b) for b in buckets)}
    times = {name: [] for name in setups}
    with engine.generating():
        prefill()  # warm-up
        for _ in range(args.reps):  # interleaved: the machine's drift hits both alike
            for name, cost in setups.items():
                kv.BUCKET_COST = cost
                times[name].append(prefill())
    kv.BUCKET_COST = setups["groups of similar length"]
    print(f"{args.model}, packed fp32, {torch.get_num_threads()} threads; {len(ids)} chat prompts of {min(lengths)} to "
          f"{max(lengths)} tokens ({sum(lengths)} in all); median of {args.reps}\n")
    forwards = {ONE_BATCH: 1, kv.BUCKET_COST: len(buckets)}
    table(["prefill", "forwards", "tokens computed", "seconds"],
          [[name, forwards[cost], f"{computed[cost]:,}", f"{statistics.median(times[name]):.2f}"]
           for name, cost in setups.items()])
    one, grouped = (statistics.median(times[n]) for n in setups)
    print(f"\ngroups / one batch: {grouped / one:.2f}x the time")
