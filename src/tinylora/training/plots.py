"""PNG plots of a run: training reward and accuracy per step, and evaluation points."""

from __future__ import annotations

from pathlib import Path


def plot_run(metrics: list[dict], evals: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kept = [m for m in metrics if not m.get("skipped")]
    key, label = ("reward_mean", "train reward (mean of B×G samples)") if kept and "reward_mean" in kept[0] \
        else ("loss", "SFT loss (token mean)")
    steps = [m["step"] for m in kept]
    rewards = [m[key] for m in kept]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, marker="o", ms=3, label=label)
    if len(rewards) >= 5:
        w = 5
        smooth = [sum(rewards[max(0, i - w + 1):i + 1]) / len(rewards[max(0, i - w + 1):i + 1])
                  for i in range(len(rewards))]
        ax.plot(steps, smooth, label="moving mean (5 steps)")
    for e in evals:
        lo, hi = e["ci95"]
        ax.errorbar([e["step"]], [e["accuracy"]], yerr=[[e["accuracy"] - lo], [hi - e["accuracy"]]], fmt="s",
                    color="k", capsize=3)
    if evals:
        ax.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "k--", label="held-out accuracy (95% CI)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy" if key == "reward_mean" else "loss / accuracy")
    if key == "reward_mean":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "reward.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
