"""A sweep's results.csv: one row per run, from its spec options and its summary.json and metrics.jsonl."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tinylora.atomic import atomic_write_text

if TYPE_CHECKING:
    from tinylora.study.spec import Run

RESULT_COLUMNS = ("algo", "method", "trainable_params", "adapter_bytes", "steps", "rule", "n_eval",
                  "base_acc", "base_acc_lo", "base_acc_hi", "base_lenient", "base_lenient_lo", "base_lenient_hi",
                  "final_acc", "final_acc_lo", "final_acc_hi", "final_lenient", "final_lenient_lo", "final_lenient_hi",
                  "evals", "train_reward_start", "train_reward_end", "zero_std_frac", "wall_seconds", "train_seconds",
                  "rollouts")
TIME_COLUMNS = ("wall_seconds", "train_seconds")


def train_signal(metrics: Path, window: int = 5) -> dict:
    """GRPO's training signal from metrics.jsonl: the mean sampled reward over the first and the last `window`
    steps, and the mean fraction of groups whose samples all scored the same (no advantage, no gradient)."""
    try:
        steps = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return {}
    steps = [m for m in steps if "reward_mean" in m and "zero_std_frac" in m]
    if not steps:
        return {}

    def mean(key, ms):
        return round(sum(m[key] for m in ms) / len(ms), 4)
    return {"train_reward_start": mean("reward_mean", steps[:window]),
            "train_reward_end": mean("reward_mean", steps[-window:]), "zero_std_frac": mean("zero_std_frac", steps),
            "rollouts": sum(m.get("rollouts", 0) for m in steps) or ""}  # samples generated (older runs: blank)


def result_row(run: Run, status: str, error: str, summary: dict | None, option_keys: list[str],
               run_dir: Path | None = None) -> dict:
    row = {"name": run.name, "status": status, "error": error, "run_key": run.key}
    row.update({k: run.options.get(k, "") for k in option_keys})
    row.update(algo=run.args.algo, method=run.args.method, steps=run.args.steps)
    if summary:
        base, final = summary.get("base_eval") or {}, summary.get("final_eval") or {}
        row.update(algo=summary["algo"], method=summary["config"]["method"],
                   trainable_params=summary["trainable_params"], adapter_bytes=summary["adapter_bytes"],
                   steps=summary["steps"], rule=final.get("reward", base.get("reward", "")),
                   n_eval=final.get("n_samples", base.get("n_samples", "")),
                   wall_seconds=summary["wall_seconds"], train_seconds=summary["train_seconds"],
                   evals=_curve(summary.get("evals_during") or []))
        if run_dir is not None:
            row.update(train_signal(run_dir / "metrics.jsonl"))
        for prefix, e in (("base", base), ("final", final)):
            for name, key in (("acc", ""), ("lenient", "lenient_")):
                if key + "accuracy" in e:
                    lo, hi = e[key + "ci95"]
                    row.update({f"{prefix}_{name}": round(e[key + "accuracy"], 4),
                                f"{prefix}_{name}_lo": round(lo, 4), f"{prefix}_{name}_hi": round(hi, 4)})
    return row


def _curve(evals: list[dict]) -> str:
    """--eval-every's learning curve as "step:strict/lenient" pairs, e.g. "20:0.56/0.63 40:0.6/0.665"."""
    return " ".join(f"{e['step']}:{round(e['accuracy'], 4)}/" + (f"{round(e['lenient_accuracy'], 4)}"
                    if "lenient_accuracy" in e else "") for e in evals)


def read_curve(text: str) -> list[tuple[int, float, float | None]]:
    """The `evals` column back as (step, strict, lenient or None) points."""
    points = []
    for pair in text.split():
        step, accs = pair.split(":")
        strict, _, lenient = accs.partition("/")
        points.append((int(step), float(strict), float(lenient) if lenient else None))
    return points


def read_results(path: Path) -> dict[str, dict]:
    """Rows of an earlier results.csv by run name (how a sweep whose run folders are gone still knows)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def write_results(path: Path, rows: list[dict], option_keys: list[str]) -> None:
    columns = ["name", "status", "error", "run_key", *option_keys, *RESULT_COLUMNS]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())
