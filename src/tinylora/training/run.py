"""The pieces of one training run around the trainer (`tinylora.api.train` puts them together): the held-out
evaluations before, during and after training, the time a run spent over all its sittings, and the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from tinylora.atomic import atomic_write_text
from tinylora.evaluation.evaluate import accuracy_line
from tinylora.evaluation.evaluate import evaluate as score_problems

DURING_KEYS = ("step", "accuracy", "ci95", "lenient_accuracy", "lenient_ci95")


class HeldOut:
    """The held-out problems scored greedily by one rule: the base model, mid-training, and the trained adapter.

    Each evaluation reuses the rollouts' generation weights where they match training (`for_evaluation`)."""

    def __init__(self, model, tokenizer, adapter, problems, weights, rule: str, out: Path, *, max_new_tokens: int,
                 batch_size: int, suffix: str, system: str | None, progress: bool, label: str = "", tracker=None):
        self.model, self.tokenizer, self.adapter, self.problems = model, tokenizer, adapter, problems
        self.weights, self.rule, self.out, self.label, self.tracker = weights, rule, out, label, tracker
        self.settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, reward=rule, suffix=suffix,
                             system=system, progress=progress)

    def _score(self, name: str, exact: bool = False, **kwargs) -> dict:
        return score_problems(self.model, self.tokenizer, self.problems, out_jsonl=self.out / f"eval_{name}.jsonl",
                              desc=f"{self.label}eval {name.replace('step', 'step ')}",
                              weights=self.weights.for_evaluation(self.model, exact=exact), **self.settings, **kwargs)

    def base(self, resume: bool) -> tuple[dict, bool]:
        """(the base model's evaluation, whether it was reused): a resumed run, or a sweep's copy from an identical
        run, reads eval_base.json instead of scoring again."""
        path = self.out / "eval_base.json"
        if resume and path.is_file():
            base, reused = json.loads(path.read_text()), True
        else:
            with self.adapter.disabled():
                base, reused = self._score("base"), False
            base["step"] = 0
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(base))
        if self.tracker:
            self.tracker.log_eval("base", base)
        return base, reused

    def during(self, steps_done: int) -> dict:
        """Mid-training: greedy, so training's RNG is untouched; exact, so the weights training goes on with are
        restored bit for bit."""
        e = self._score(f"step{steps_done}", exact=True, adapter=self.adapter)
        e["step"] = steps_done
        tqdm.write(f"step {steps_done}: {accuracy_line(e, self.rule)}")  # print would break the progress bar
        if self.tracker:
            self.tracker.log_eval("during", e)
        return {k: e[k] for k in DURING_KEYS if k in e}

    def final(self, steps_done: int) -> dict:
        e = self._score("final", adapter=self.adapter)
        e["step"] = steps_done
        if self.tracker:
            self.tracker.log_eval("final", e)
        return e


class TimeSpent:
    """A run's cost over all its sittings in OUT/time_spent.json, rewritten after every step, so a resumed run adds
    to what the earlier sittings spent."""

    def __init__(self, out: Path, resume: bool, started: float):
        self.path, self.started = out / "time_spent.json", started
        self.before = {"wall_seconds": 0.0, "train_seconds": 0.0, "sittings": 0}
        if resume and self.path.is_file():
            try:
                self.before.update(json.loads(self.path.read_text()))
            except ValueError:  # unreadable: count from here
                pass
        self.train_started, self.train_ended = time.time(), None

    def training_done(self) -> None:
        """Stop the training clock: the final evaluation counts to the wall time only."""
        self.train_ended = time.time()

    def totals(self) -> dict:
        now = time.time()
        return {"wall_seconds": self.before["wall_seconds"] + now - self.started,
                "train_seconds": self.before["train_seconds"] + (self.train_ended or now) - self.train_started,
                "sittings": self.before["sittings"] + 1}

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.totals()))


def summarize(*, model: str, task: str, algo: str, adapter, adapter_path: Path, history: list[dict], base, final,
              base_reused: bool, spent: dict, stopped_early: bool) -> dict:
    """summary.json: what was trained, the evaluations, and what it cost."""
    steps_done = [m for m in history if "tokens_per_s" in m]
    return {
        "model": model, "task": task, "algo": algo,
        "config": json.loads(adapter.config.to_json()),
        "trainable_params": adapter.num_trainable(), "adapter_file": str(adapter_path),
        "adapter_bytes": adapter_path.stat().st_size, "steps": len(history),
        "base_eval": base, "base_eval_reused": base_reused, "final_eval": final,
        "evals_during": [m["eval"] for m in history if "eval" in m],
        "train_seconds": round(spent["train_seconds"], 1),
        "wall_seconds": round(spent["wall_seconds"], 1),
        "sittings": spent["sittings"],
        "mean_step_seconds": round(sum(m["step_time"] for m in history) / max(len(history), 1), 2),
        "rollout_tokens_per_s": round(sum(m["tokens_per_s"] for m in steps_done) / max(len(steps_done), 1), 1),
        "stopped_early": stopped_early,
    }


def report(summary: dict, rule: str, out: Path, say=print) -> None:
    """The lines a run ends with."""
    base, final = summary["base_eval"], summary["final_eval"]
    say("\n" + "=" * 64)
    if base and final:
        say(f"accuracy  {accuracy_line(base, rule)}\n      →   {accuracy_line(final, rule)}")
    say(f"trained   {summary['trainable_params']:,} parameters, adapter file {summary['adapter_bytes']} bytes "
        f"({summary['adapter_file']})")
    say(f"time      {summary['wall_seconds'] / 60:.1f} min total, {summary['steps']} steps of "
        f"{summary['mean_step_seconds']:.0f} s, rollouts {summary['rollout_tokens_per_s']:.0f} tokens/s")
    if summary["stopped_early"]:
        say(f"stopped early: continue with the same command plus --resume (out: {out})")
    say(f"outputs   {out}/ (summary.json, metrics.jsonl, reward.png, eval_*.jsonl)")
