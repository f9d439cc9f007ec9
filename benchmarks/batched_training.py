"""`bench.py batched`: N adapters trained in one batched run against N runs one after another, side by side.

Each of `--runs` users (default 8) has its own arithmetic problems (its own seed) in one JSONL file, with a
`user` column. Batched (first): one `train(..., DataConfig(adapter_column="user"))` over the whole file: one
model load and SVD, one batched base and final evaluation, and each step's rollouts of all users in shared
batches. Then sequentially: `tinylora.api.train` once per user on that user's rows (model load, base
evaluation, `--steps` GRPO steps, final evaluation, each time; the SVD cache is warm by then). Same model,
task, steps, B, G and held-out rows per user. Reported: wall time of each and their ratio.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from common import table

from tinylora.api import DataConfig, ModelConfig, RunConfig, train
from tinylora.config import AdapterConfig
from tinylora.tasks.arithmetic import generate
from tinylora.training.config import TrainConfig

ROWS_PER_USER = 60
HELD_OUT = 10


def write_users(folder: Path, n_users: int) -> tuple[Path, list[Path]]:
    """users.jsonl (every user's rows, a `user` column) and one file per user with the same rows."""
    everyone, files = [], []
    for u in range(n_users):
        rows = [{"user": f"user{u}", "question": p.question, "answer": p.answer}
                for p in generate(ROWS_PER_USER, seed=1000 + u, levels=(1, 2))]
        everyone += rows
        files.append(folder / f"user{u}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in everyone))
    return folder / "users.jsonl", files


def bench_batched(args) -> None:
    n, steps = args.runs, args.steps
    training = TrainConfig(steps=steps, batch_prompts=args.batch, group_size=args.group)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        users, files = write_users(tmp, n)
        model, adapter = ModelConfig(model=args.model), AdapterConfig(n_tie=16)
        t = time.perf_counter()  # batched first: a machine that gets quieter during the run favours the other
        together = train(model, DataConfig(data=str(users), eval_n=HELD_OUT, adapter_column="user"), adapter,
                         training, RunConfig(out=str(tmp / "batched"), progress=False))
        t_batched = time.perf_counter() - t
        t = time.perf_counter()
        solo = [train(model, DataConfig(data=str(f), eval_n=HELD_OUT), adapter, training,
                      RunConfig(out=str(tmp / f"solo{i}"), progress=False)) for i, f in enumerate(files)]
        t_solo = time.perf_counter() - t
    before = sum(s["base_eval"]["accuracy"] for s in solo) / n
    after = sum(s["final_eval"]["accuracy"] for s in solo) / n
    print()
    table(["", "wall (s)", "mean held-out reward before → after"],
          [[f"{n} runs one after another", f"{t_solo:.0f}", f"{before:.3f} → {after:.3f}"],
           [f"{n} adapters in one batched run", f"{t_batched:.0f}",
            f"{together['base_reward']['mean']:.3f} → {together['final_reward']['mean']:.3f}"]])
    print(f"\nbatched / sequential wall: {t_batched / t_solo:.2f}x ({n} adapters, {steps} steps of "
          f"{args.batch} prompts x {args.group}, {HELD_OUT} held-out rows each, {args.model})")
