"""`tinylora train`: evaluate the base model, train, evaluate again, save adapter + summary + plots."""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path

from . import cpu_weights, dist
from .cli import adapter_config, task_problems
from .evaluate import evaluate
from .train import Trainer, TrainConfig


def run_training(args) -> dict:
    from .adapter import attach
    from .io import save_adapter
    from .models import load_model
    from .plots import plot_run

    t_start = time.time()
    out = Path(args.out)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    rank, _ = dist.init()
    say = print if rank == 0 else (lambda *a, **k: None)
    model, tokenizer = load_model(args.model, args.dtype)
    adapter = attach(model, adapter_config(args), progress=not args.no_progress and rank == 0)
    train_problems = task_problems(args, "train", args.n, seed=cfg.seed)
    # the held-out set does not move with --seed: runs with different seeds are scored on the same problems
    eval_problems = task_problems(args, "test", args.eval_n) if args.eval_n else []
    say(f"model {args.model}: {adapter.num_trainable():,} trainable parameters ({adapter.config.method}, "
        f"{len(adapter.targets)} modules, {len(adapter.groups)} groups); {len(train_problems)} training problems")
    label = os.environ.get("TINYLORA_PROGRESS_LABEL", "")  # set by `tinylora sweep`
    trainer = Trainer(model, tokenizer, adapter, train_problems, cfg, out, progress=not args.no_progress, label=label)
    # evaluation reuses the trainer's packed copy (exact fp32); int8 rollouts are evaluated on merged fp32
    exact_copy = trainer.fast if isinstance(trainer.fast, cpu_weights.PackedWeights) else None
    if cfg.algo == "grpo":
        say(f"rollout weights: {trainer.fast or 'fp32 with the adapter merged in for each rollout'}")
    ev = dict(max_new_tokens=cfg.max_new_tokens, batch_size=args.eval_batch_size, reward=cfg.reward,
              suffix=cfg.suffix, system=cfg.system or None, progress=not args.no_progress and rank == 0,
              weights=exact_copy)

    base_path = out / "eval_base.json"
    if eval_problems and rank == 0:
        if args.resume and base_path.is_file():
            base = json.loads(base_path.read_text())
        else:
            with adapter.disabled():
                base = evaluate(model, tokenizer, eval_problems, out_jsonl=out / "eval_base.jsonl",
                                desc=label + "eval base", **ev)
            base["step"] = 0
            out.mkdir(parents=True, exist_ok=True)
            base_path.write_text(json.dumps(base))
        say(f"base accuracy {_fmt(base)} ({cfg.reward}), {_fmt(base, 'lenient_')} (lenient: last number)")
    else:
        base = None

    t_train = time.time()
    history = trainer.fit(resume=args.resume)
    t_train = time.time() - t_train
    if rank != 0:
        dist.shutdown()
        return {}
    adapter_path = save_adapter(adapter, out / "adapter.safetensors")
    final = None
    if eval_problems:
        final = evaluate(model, tokenizer, eval_problems, adapter=adapter, out_jsonl=out / "eval_final.jsonl",
                         desc=label + "eval final", **ev)
        final["step"] = len(history)
    steps_done = [m for m in history if "tokens_per_s" in m]
    summary = {
        "model": args.model, "task": args.data or args.task, "algo": cfg.algo,
        "config": json.loads(adapter.config.to_json()),
        "trainable_params": adapter.num_trainable(), "adapter_file": str(adapter_path),
        "adapter_bytes": adapter_path.stat().st_size, "steps": len(history),
        "base_eval": base, "final_eval": final, "train_seconds": round(t_train, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "mean_step_seconds": round(sum(m["step_time"] for m in history) / max(len(history), 1), 2),
        "rollout_tokens_per_s": round(sum(m["tokens_per_s"] for m in steps_done) / max(len(steps_done), 1), 1),
        "stopped_early": trainer.stop_requested,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if history:
        plot_run(history, [e for e in (base, final) if e], out)
    say("\n" + "=" * 64)
    if base and final:
        say(f"accuracy  {_fmt(base)}  →  {_fmt(final)}  ({cfg.reward})")
        if "lenient_accuracy" in base:  # a base eval from before lenient scoring existed has none
            say(f"          {_fmt(base, 'lenient_')}  →  {_fmt(final, 'lenient_')}  (lenient: the last number)")
    say(f"trained   {summary['trainable_params']:,} parameters, adapter file {summary['adapter_bytes']} bytes "
        f"({adapter_path})")
    say(f"time      {summary['wall_seconds'] / 60:.1f} min total, {summary['steps']} steps of "
        f"{summary['mean_step_seconds']:.0f} s, rollouts {summary['rollout_tokens_per_s']:.0f} tokens/s")
    if trainer.stop_requested:
        say(f"stopped early: continue with the same command plus --resume (out: {out})")
    say(f"outputs   {out}/ (summary.json, metrics.jsonl, reward.png, eval_*.jsonl)")
    dist.shutdown()
    return summary


def _fmt(e: dict, prefix: str = "") -> str:
    lo, hi = e[prefix + "ci95"]
    return f"{e[prefix + 'accuracy']:.1%} [95% CI {lo:.1%}–{hi:.1%}, n={e['n_samples']}]"
