"""The sweep's plot: held-out accuracy against trained numbers (log x), one line per algorithm.

Each line joins the best run at each size (the best learning rate, as the paper picks per size);
every run is a faint dot; error bars are 95% Wilson intervals; the base model is a horizontal line.
The left panel scores by the run's rule (strict), the right one by the lenient rule.
"""

from __future__ import annotations

from pathlib import Path


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def best_per_size(rows: list[dict], algo: str, metric: str = "final_acc") -> list[dict]:
    """The run with the highest `metric` at each trainable count, for one algorithm, by size."""
    best: dict[float, dict] = {}
    for r in rows:
        n, acc = _num(r.get("trainable_params")), _num(r.get(metric))
        if r.get("status") == "done" and r.get("algo") == algo and n and acc is not None:
            if n not in best or acc > _num(best[n][metric]):
                best[n] = r
    return [best[n] for n in sorted(best)]


def plot_sweep(rows: list[dict], path: Path) -> Path | None:
    done = [r for r in rows if r.get("status") == "done" and _num(r.get("trainable_params"))]
    if not done:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    algos = sorted({r["algo"] for r in done})
    for ax, (metric, title) in zip(axes, (("acc", "strict (the run's rule)"), ("lenient", "lenient (last number)"))):
        bases = [_num(r.get(f"base_{metric}")) for r in done if _num(r.get(f"base_{metric}")) is not None]
        if bases:
            ax.axhline(sum(bases) / len(bases), color="gray", ls="--", lw=1, label="base model")
        for i, algo in enumerate(algos):
            color = f"C{i}"
            mine = [r for r in done if r["algo"] == algo and _num(r.get(f"final_{metric}")) is not None]
            ax.scatter([_num(r["trainable_params"]) for r in mine], [_num(r[f"final_{metric}"]) for r in mine],
                       color=color, alpha=0.25, s=14)
            best = best_per_size(mine, algo, f"final_{metric}")
            xs = [_num(r["trainable_params"]) for r in best]
            ys = [_num(r[f"final_{metric}"]) for r in best]
            lo = [y - _num(r[f"final_{metric}_lo"]) for y, r in zip(ys, best)]
            hi = [_num(r[f"final_{metric}_hi"]) - y for y, r in zip(ys, best)]
            ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker="o", capsize=3,
                        label=f"{algo.upper()} (best per size)")
        ax.set_xscale("log")
        ax.set_xlabel("trained numbers")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out accuracy (95% CI)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
