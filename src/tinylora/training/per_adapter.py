"""One adapter per user (or per any column value) of a data file, trained together in one batched run, written
into one adapter pack: `tinylora train --data users.jsonl --adapter-column user`.

Each value of the column gets the rows that carry it: its last `eval_n` rows are held out (or its rows of
--eval-data), the rest train it. The held-out rows are scored greedily before and after training, every
adapter in one batch, by the run's reward rule, and the run reports each adapter's reward and their spread.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from tinylora.atomic import atomic_write_text
from tinylora.tasks import Problem, load_task, without_questions
from tinylora.tasks.rewards import load_reward, score

PACK_NAME = "adapters.pack"


def split_by_column(path: str, column: str, prompt_template: str | None) -> dict[str, list[Problem]]:
    """The rows of a JSONL file grouped by the value of `column`, in file order; a row without it, or a value that
    cannot name an adapter, raises naming the row and the file."""
    groups: dict[str, list[Problem]] = {}
    for i, p in enumerate(load_task(path, prompt_template=prompt_template), start=1):
        if column not in p.columns or p.columns[column] is None:
            raise ValueError(f"{path}: row {i} has no {column!r} column (--adapter-column)")
        name = str(p.columns[column])
        if not name or "/" in name or name != name.strip():
            raise ValueError(f"{path}: row {i}: {column}={name!r} cannot name an adapter (empty, a '/', or spaces "
                             "around it)")
        groups.setdefault(name, []).append(p)
    return groups


def per_adapter_problems(data) -> list[tuple[str, list[Problem], list[Problem]]]:
    """(name, training problems, held-out problems) per column value of `data` (a DataConfig)."""
    rows = split_by_column(data.data, data.adapter_column, data.prompt_template)
    held = split_by_column(data.eval_data, data.adapter_column, data.prompt_template) if data.eval_data else None
    out = []
    for name, mine in rows.items():
        if held is not None:
            test = held.get(name, [])
        elif data.eval_n:
            if len(mine) <= data.eval_n:
                raise ValueError(f"{data.data}: {data.adapter_column}={name!r} has {len(mine)} rows, none left to "
                                 f"train on after holding out --eval-n {data.eval_n} (per adapter); lower --eval-n")
            mine, test = mine[:-data.eval_n], mine[-data.eval_n:]
        else:
            test = []
        train, _ = without_questions(mine, test)  # held out means held out
        if not train:
            raise ValueError(f"{data.data}: {data.adapter_column}={name!r} has no training row left")
        out.append((name, train, test[:data.n] if data.n else test))
    return out


def reward_by_adapter(trainer, held_out: dict[str, list[Problem]], rule: str, *, trained: bool, max_new_tokens: int,
                      batch_size: int) -> dict[str, float]:
    """Mean reward of each adapter's held-out problems, greedy, every adapter's rows in shared batches
    (`trained`: with its adapter; else the base model)."""
    reward = load_reward(rule)
    items = [(name, p) for name, probs in held_out.items() for p in probs]
    got: dict[str, list[float]] = {name: [] for name in held_out}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = trainer.prompts([p for _, p in chunk])
        ro = trainer.engine.generate(prompts, max_new_tokens=max_new_tokens, greedy=True, with_logprobs=False,
                                     adapters=[name for name, _ in chunk] if trained else None)
        scores = score(reward, ro.completions, prompts, [p.columns for _, p in chunk])
        for (name, _), s in zip(chunk, scores):
            if s is not None:
                got[name].append(float(s))
    return {name: sum(x) / len(x) if x else float("nan") for name, x in got.items()}


def spread(values: dict[str, float]) -> dict:
    """Mean, standard deviation, min and max over adapters (NaN: no scored row, left out)."""
    x = [v for v in values.values() if not math.isnan(v)]
    if not x:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(x) / len(x), "std": statistics.stdev(x) if len(x) > 1 else 0.0, "min": min(x),
            "max": max(x), "n": len(x)}


def write_pack(path: Path, trainer) -> Path:
    """Every trained adapter into the pack at `path` (created, or updated in place on a rerun), in one
    transaction."""
    from tinylora.storage.file import base_name
    from tinylora.storage.pack import Pack
    bank = trainer.bank
    if not path.exists():
        Pack.create(path, like=(bank.config, bank.fingerprint, base_name(trainer.model),
                                tuple(trainer.v[0].shape))).close()
    with Pack(path) as pack:
        pack.put(trainer.trainable_state())
    return path


def train_per_adapter(model, data, adapter, cfg, run) -> dict:
    """`tinylora.api.train` with `data.adapter_column` set: the configs as there."""
    from tinylora.generation.bank import AdapterBank
    from tinylora.models import load_model
    from tinylora.training.batched import BatchedTrainer, Member
    t_start, out = time.time(), Path(run.out)
    if run.eval_every:
        raise ValueError(f"eval_every={run.eval_every} (--eval-every) is not available with --adapter-column: the "
                         "held-out rows are scored before and after training")
    plan = per_adapter_problems(data)
    net, tokenizer = load_model(model.model, model.dtype, model.device)
    bank = AdapterBank(net, config=adapter, progress=run.progress)
    members = [Member(name, train, replace(cfg)) for name, train, _ in plan]
    trainer = BatchedTrainer(net, tokenizer, bank, members, out, progress=run.progress)
    held_out = {name: test for name, _, test in plan if test}
    rule = run.eval_reward or cfg.reward
    ev = dict(max_new_tokens=cfg.max_new_tokens, batch_size=run.eval_batch_size)
    print(f"{len(members)} adapters ({data.adapter_column}), {sum(len(m.problems) for m in members)} training rows, "
          f"{sum(map(len, held_out.values()))} held out; {bank.adapter.num_trainable()} numbers each; "
          f"rollout weights: {trainer.engine.weights}")
    base_path = out / "eval_base.json"
    if run.resume and base_path.is_file():
        base = json.loads(base_path.read_text())
    else:
        with torch.no_grad():
            base = reward_by_adapter(trainer, held_out, rule, trained=False, **ev) if held_out else {}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(base_path, json.dumps(base))
    t_train = time.time()
    history = trainer.fit(resume=run.resume)
    t_train = time.time() - t_train
    pack = write_pack(out / PACK_NAME, trainer)
    final = {}
    if held_out and not trainer.stop_requested:
        with torch.no_grad():
            final = reward_by_adapter(trainer, held_out, rule, trained=True, **ev)
        atomic_write_text(out / "eval_final.json", json.dumps(final))
    summary = {"model": model.model, "data": data.data, "adapter_column": data.adapter_column, "algo": cfg.algo,
               "config": json.loads(adapter.to_json()), "adapters": len(members), "pack": str(pack),
               "pack_bytes": pack.stat().st_size, "bytes_per_adapter": round(pack.stat().st_size / len(members), 1),
               "trainable_params_each": bank.adapter.num_trainable(), "steps": len(history), "reward_rule": rule,
               "base_reward": spread(base), "final_reward": spread(final) if final else None,
               "train_seconds": round(t_train, 1), "wall_seconds": round(time.time() - t_start, 1),
               "stopped_early": trainer.stop_requested}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    report(summary, base, final)
    return summary


def report(summary: dict, base: dict, final: dict) -> None:
    print("\n" + "=" * 64)
    b, f = summary["base_reward"], summary["final_reward"]
    if b["n"] and f and f["n"]:
        print(f"reward    {b['mean']:.3f} ± {b['std']:.3f} → {f['mean']:.3f} ± {f['std']:.3f} (mean ± std over "
              f"{f['n']} adapters, {summary['reward_rule']}); {sum(final[k] > base[k] for k in final)} improved, "
              f"{sum(final[k] < base[k] for k in final)} worse")
    print(f"trained   {summary['adapters']} adapters of {summary['trainable_params_each']} numbers in "
          f"{summary['pack']} ({summary['pack_bytes']:,} bytes, {summary['bytes_per_adapter']:.0f} per adapter)")
    print(f"time      {summary['wall_seconds'] / 60:.1f} min total, {summary['steps']} steps")
    if summary["stopped_early"]:
        print("stopped early: continue with the same command plus --resume")
