"""`tinylora sweep SPEC --batched`: the runs of a sweep that differ only in per-adapter settings train together.

Runs whose `tinylora train` flags agree on everything but PER_ADAPTER (seed, rate and schedule, clip, weight
decay, reward, and the adapter's u, n_tie, tying and v dtype) form a group; a group trains in one process,
one `training.batched.BatchedTrainer` over one model load and SVD, and writes into every run's folder what
that run alone would have written (adapter file, summary.json, metrics.jsonl, evaluation rows), so results.csv,
resuming and `--only` work as for runs trained one by one. Each adapter ends where it would have ended alone,
up to the order of float sums (tests/test_batched.py). The base model's evaluation is run once per group,
and each adapter's final evaluation is the one a solo run makes (its own adapter attached, the same weights).
A run's wall_seconds and train_seconds are its group's divided by the group's size.

    python -m tinylora.study.batched PLAN.json      # what the sweep starts for a group (PLAN: runs and folders)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from tinylora.atomic import atomic_write_text
from tinylora.methods import method_of
from tinylora.study.spec import Run, TrainParser
from tinylora.training.batched import PER_ADAPTER_SETTINGS

# a batched run's per-adapter training settings, and the adapter config fields a bank's rows may differ in
PER_ADAPTER = (*PER_ADAPTER_SETTINGS, "u", "n_tie", "tie", "v_dtype")


def batch_key(run: Run) -> str | None:
    """Runs with one key train together; None: this run trains alone (a setting a batched run lacks)."""
    a = run.args
    alone = (not method_of(a.method).single_v or a.dynamic_sampling or a.mini_batches > 1 or a.epochs > 1
             or a.beta > 0 or a.eval_every > 0 or a.v_dtype == "fp16" or a.adapter_column is not None)
    if alone:
        return None
    return json.dumps({k: v for k, v in sorted(vars(a).items()) if k not in PER_ADAPTER}, default=str)


def groups(runs: list[Run]) -> list[list[Run]]:
    """The runs in groups that train together, in the spec's order of each group's first run."""
    by_key: dict[str, list[Run]] = {}
    out = []
    for r in runs:
        key = batch_key(r)
        if key is None:
            out.append([r])
        elif key in by_key:
            by_key[key].append(r)
        else:
            by_key[key] = [r]
            out.append(by_key[key])
    return out


def train_together(plan: dict, progress: bool = False) -> None:
    """Train the group `plan` describes ({"dir": group folder, "runs": [{"name", "argv", "dir"}]})."""
    from tinylora.cli.flags import train_configs
    from tinylora.evaluation.evaluate import evaluate as score_problems
    from tinylora.generation.bank import AdapterBank
    from tinylora.io import save_adapter
    from tinylora.models import load_model
    from tinylora.training.batched import BatchedTrainer, Member
    t_start, parser = time.time(), TrainParser()
    entries = plan["runs"]
    configs = [train_configs(parser.parse_args(e["argv"])) for e in entries]
    model_cfg, data = configs[0][0], configs[0][1]
    members = []
    for e, (_, _, adapter, cfg, _) in zip(entries, configs):
        cfg = replace(cfg, suffix=data.instruction()) if cfg.suffix is None else cfg
        members.append(Member(e["name"], data.training_pool(data.n, seed=cfg.seed)[0], cfg, adapter))
    run_cfg = configs[0][4]
    net, tok = load_model(model_cfg.model, model_cfg.dtype, model_cfg.device)
    bank = AdapterBank(net, config=members[0].adapter, progress=progress)
    trainer = BatchedTrainer(net, tok, bank, members, Path(plan["dir"]), progress=progress)
    eval_problems = data.problems("test", data.eval_n) if data.eval_n else []
    weights = evaluation_weights(trainer.engine.weights, members[0].cfg.rollout_weights, net)

    def settings(m: Member) -> dict:
        return dict(max_new_tokens=m.cfg.max_new_tokens, batch_size=run_cfg.eval_batch_size, suffix=m.cfg.suffix,
                    system=m.cfg.system or None, reward=run_cfg.eval_reward or m.cfg.reward, progress=progress)
    bases = {}  # scoring rule -> the base model's evaluation: once per rule, shared by the runs scored by it
    for e, m in zip(entries, members) if eval_problems else ():
        out, rule = Path(e["dir"]), settings(m)["reward"]
        if (out / "eval_base.json").is_file():
            bases.setdefault(rule, (json.loads((out / "eval_base.json").read_text()), out))
        elif rule in bases:
            for name in ("eval_base.jsonl", "eval_base.json"):  # the .json last: it marks the copy complete
                if (bases[rule][1] / name).is_file():
                    (out / name).write_bytes((bases[rule][1] / name).read_bytes())
        else:
            with bank.adapter.disabled():
                base = score_problems(net, tok, eval_problems, out_jsonl=out / "eval_base.jsonl", weights=weights,
                                      desc="eval base", **settings(m))
            base["step"] = 0
            atomic_write_text(out / "eval_base.json", json.dumps(base))
            bases[rule] = (base, out)
    t_train = time.time()
    history = trainer.fit(resume=True)
    t_train = time.time() - t_train
    if trainer.stop_requested:
        return
    bank.adapter.detach()  # each run's own adapter now, as its solo run has it
    finals = []
    for k, (e, m) in enumerate(zip(entries, members)):
        ad = trainer.attach_member(k)
        path = save_adapter(ad, Path(e["dir"]) / "adapter.safetensors")
        final = None
        if eval_problems:
            final = score_problems(net, tok, eval_problems, adapter=ad, out_jsonl=Path(e["dir"]) / "eval_final.jsonl",
                                   weights=weights, desc=f"eval final {m.name}", **settings(m))
            final["step"] = len(history)
        finals.append((path, final, ad.num_trainable(), json.loads(ad.config.to_json())))
        ad.detach()
    # the summaries last, all together: a group cut off before this point is rerun whole (same folder, same
    # checkpoint), not split into a smaller group that would start over
    wall_share, train_share = (time.time() - t_start) / len(members), t_train / len(members)
    for e, m, (path, final, n_trainable, config) in zip(entries, members, finals):
        out = Path(e["dir"])
        mine = [{"step": h["step"], **h["adapters"][m.name], "rollouts": m.cfg.batch_prompts * m.cfg.group_size,
                 "step_time": h["step_time"], "tokens_per_s": h.get("tokens_per_s", 0.0)} for h in history]
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in mine))
        base = json.loads((out / "eval_base.json").read_text()) if eval_problems else None
        summary = {"model": model_cfg.model, "task": data.source, "algo": m.cfg.algo, "config": config,
                   "trainable_params": n_trainable, "adapter_file": str(path), "adapter_bytes": path.stat().st_size,
                   "steps": len(history), "base_eval": base, "base_eval_reused": bases.get(
                       settings(m)["reward"], (None, out))[1] != out, "final_eval": final, "evals_during": [],
                   "train_seconds": round(train_share, 1), "wall_seconds": round(wall_share, 1), "sittings": 1,
                   "mean_step_seconds": round(sum(h["step_time"] for h in history) / max(len(history), 1), 2),
                   "rollout_tokens_per_s": round(sum(h.get("tokens_per_s", 0.0) for h in history)
                                                 / max(len(history), 1), 1),
                   "stopped_early": False, "batched_with": [x["name"] for x in entries]}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


def evaluation_weights(rollout, choice: str, model):
    """The weights a solo run of these settings would evaluate with. A bank generates with hooks where a solo run
    merges (a merge gives every row one adapter): on a CPU in fp32 the solo run's evaluation merges, so this does."""
    from tinylora.generation import weights as cpu_weights
    weight = next(model.parameters())
    if isinstance(rollout, cpu_weights.AdapterHooks) and choice != "hooks" and weight.device.type == "cpu" \
            and weight.dtype == torch.float32:
        return cpu_weights.Merged()
    return rollout.for_evaluation(model)


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    try:
        train_together(plan, progress="--progress" in sys.argv[2:])
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
