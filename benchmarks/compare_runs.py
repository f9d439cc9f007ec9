"""Reward curves of two or more runs on one plot, plus a table (issue #4: rollout weights compared).

    python benchmarks/compare_runs.py runs/merged runs/packed runs/int8 --out benchmarks/reward_by_rollout_weights.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(run: Path) -> tuple[list[dict], dict | None]:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = run / "summary.json"
    return metrics, json.loads(summary.read_text()) if summary.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="output folders of `tinylora train`")
    p.add_argument("--out", type=Path, default=Path("reward_curves.png"))
    p.add_argument("--window", type=int, default=5, help="moving-mean window (steps)")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    print("| run | steps | mean reward, first half | mean reward, second half | mean step (s) | mean rollout (s) "
          "| final accuracy |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        metrics, summary = load(run)
        r = [m["reward_mean"] for m in metrics]
        w = args.window
        smooth = [statistics.mean(r[max(0, i - w + 1):i + 1]) for i in range(len(r))]
        line, = ax.plot(range(len(r)), r, alpha=0.3)
        ax.plot(range(len(r)), smooth, color=line.get_color(), label=f"{run.name} (moving mean, {w} steps)")
        half = len(r) // 2
        acc = "–"
        if summary and summary.get("final_eval"):
            e = summary["final_eval"]
            acc = f"{e['accuracy']:.1%} [{e['ci95'][0]:.1%}–{e['ci95'][1]:.1%}]"
        print(f"| {run.name} | {len(r)} | {statistics.mean(r[:half]):.3f} | {statistics.mean(r[half:]):.3f} | "
              f"{statistics.mean(m['step_time'] for m in metrics):.1f} | "
              f"{statistics.mean(m['gen_time'] for m in metrics):.1f} | {acc} |")
    ax.set_xlabel("step")
    ax.set_ylabel("train reward (mean of B×G samples)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
