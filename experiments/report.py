"""Markdown tables for docs/reproduction.md from a sweep's results.csv, and a copy of the CSV and plot there.

    python experiments/report.py runs/param_curve --kind curve     # best learning rate per size and algorithm
    python experiments/report.py runs/ablations --kind seeds       # each setting over its seeds
    python experiments/report.py runs/seeds --kind seeds           # the headline sizes over three seeds
    python experiments/report.py runs/steps --kind steps           # accuracy at each --eval-every step

Every number printed is a cell of results.csv (fractions shown as percentages); run names trace them.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
from pathlib import Path

from tinylora.study.results import read_curve

SETTING_KEYS = ("method", "n-tie", "u", "r", "tie", "v-dtype")


def pct(row: dict, key: str, ci: bool = True) -> str:
    if row.get(key) in (None, ""):
        return "–"
    text = f"{100 * float(row[key]):.1f}"
    if ci and row.get(key + "_lo") not in (None, ""):
        text += f" [{100 * float(row[key + '_lo']):.1f}–{100 * float(row[key + '_hi']):.1f}]"
    return text


def setting(row: dict) -> str:
    parts = [f"{k}={row[k]}" for k in SETTING_KEYS if row.get(k) not in (None, "") and k != "method"]
    return " ".join([row.get("method", "")] + parts)


def lr(row: dict) -> str:
    return f"{float(row['lr']):g}" if row.get("lr") not in (None, "") else "default"


def curve(rows: list[dict]) -> None:
    """One line per (algorithm, size): the run with the best final strict accuracy over its learning rates."""
    done = [r for r in rows if r["status"] == "done"]
    best: dict[tuple, dict] = {}
    tried: dict[tuple, list[tuple[float, str]]] = {}
    for r in done:
        key = (r["algo"], int(r["trainable_params"]), setting(r))
        tried.setdefault(key, []).append((float(r["lr"] or 0), f"{lr(r)}: {pct(r, 'final_acc', ci=False)}"))
        if key not in best or float(r["final_acc"]) > float(best[key]["final_acc"]):
            best[key] = r
    print("| algo | trained numbers | setting | best lr | final strict [95% CI] | final lenient [95% CI] "
          "| strict by lr | run |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(best, key=lambda k: (k[0], k[1])):
        r, by_lr = best[key], "; ".join(text for _, text in sorted(tried[key]))
        print(f"| {r['algo'].upper()} | {int(r['trainable_params']):,} | {key[2]} | {lr(r)} | "
              f"{pct(r, 'final_acc')} | {pct(r, 'final_lenient')} | {by_lr} | `{r['name']}` |")
    bases = {(r["base_acc"], r["base_lenient"]) for r in done}
    for acc, len_ in sorted(bases):
        print(f"\nBase model: strict {100 * float(acc):.1f}%, lenient {100 * float(len_):.1f}% (n = "
              f"{done[0]['n_eval']}).")
    pending = [r["name"] for r in rows if r["status"] != "done"]
    if pending:
        print(f"\nNot yet run or failed ({len(pending)}): " + ", ".join(f"`{n}`" for n in pending))


def seeds(rows: list[dict]) -> None:
    """One line per setting (algorithm, learning rate, adapter): the bits its v takes, each seed's final
    strict/lenient accuracy and their mean."""
    done = [r for r in rows if r["status"] == "done"]
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r.get("algo", "").upper(), lr(r), setting(r)), []).append(r)
    print("| algo | lr | setting | trained numbers | bits of v | seeds | final strict by seed | mean strict "
          "| final lenient by seed | mean lenient |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (algo, rate, name), rs in groups.items():
        rs.sort(key=lambda r: int(r.get("seed") or 0))
        strict = [100 * float(r["final_acc"]) for r in rs]
        lenient = [100 * float(r["final_lenient"]) for r in rs]
        numbers = int(rs[0]["trainable_params"])
        bits = numbers * (16 if rs[0].get("v-dtype") in ("bf16", "fp16") else 32)  # v is fp32 unless told
        print(f"| {algo} | {rate} | {name} | {numbers:,} | {bits:,} | "
              f"{', '.join(r.get('seed') or '0' for r in rs)} | {', '.join(f'{x:.1f}' for x in strict)} | "
              f"{statistics.mean(strict):.1f} | {', '.join(f'{x:.1f}' for x in lenient)} | "
              f"{statistics.mean(lenient):.1f} |")


def learning_curve(row: dict) -> list[tuple[int, float, float | None]]:
    """(step, strict, lenient) from the base (step 0) through the `evals` column to the final evaluation."""
    points = [(0, float(row["base_acc"]), float(row["base_lenient"]) if row.get("base_lenient") else None)]
    points += read_curve(row.get("evals") or "")
    points.append((int(row["steps"]), float(row["final_acc"]),
                   float(row["final_lenient"]) if row.get("final_lenient") else None))
    return points


def steps(rows: list[dict], plot: Path | None = None) -> None:
    """One line per run: held-out strict / lenient accuracy at step 0 (the base), each evaluation, the end."""
    done = [r for r in rows if r["status"] == "done" and r.get("final_acc") and r.get("base_acc")]
    if not done:
        print("No finished runs with a base and a final evaluation yet.")
        return
    curves = {r["name"]: learning_curve(r) for r in done}
    columns = sorted({s for c in curves.values() for s, _, _ in c})
    print("| run | trained numbers | " + " | ".join(f"step {s}" for s in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for r in done:
        at = {s: (a, b) for s, a, b in curves[r["name"]]}
        cells = [f"{100 * at[s][0]:.1f} / {100 * at[s][1]:.1f}" if s in at and at[s][1] is not None
                 else f"{100 * at[s][0]:.1f}" if s in at else "–" for s in columns]
        print(f"| `{r['name']}` | {int(r['trainable_params']):,} | " + " | ".join(cells) + " |")
    print("\nCells: held-out accuracy strict / lenient (%); step 0 is the base model.")
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, (i, title) in zip(axes, ((1, "strict"), (2, "lenient (last number)"))):
            for name, c in curves.items():
                pts = [(p[0], p[i]) for p in c if p[i] is not None]
                ax.plot([s for s, _ in pts], [100 * a for _, a in pts], marker="o", ms=3, label=name)
            ax.set_title(title)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("held-out accuracy (%)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="a `tinylora sweep` folder (holds results.csv)")
    p.add_argument("--kind", choices=("curve", "seeds", "steps"), default="curve")
    p.add_argument("--docs", type=Path, default=Path("docs/reproduction"),
                   help="where results.csv and the plot are copied, as NAME.csv / NAME.png")
    args = p.parse_args()
    with open(args.sweep / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    args.docs.mkdir(parents=True, exist_ok=True)
    name = args.sweep.name
    shutil.copyfile(args.sweep / "results.csv", args.docs / f"{name}.csv")
    if args.kind == "steps":  # accuracy against steps, not against trained numbers
        steps(rows, plot=args.docs / f"{name}.png")
        return
    # the sweep's plot keeps the best run per size: the curve, not settings or seeds at one size
    if args.kind == "curve" and (args.sweep / "accuracy_vs_params.png").is_file():
        shutil.copyfile(args.sweep / "accuracy_vs_params.png", args.docs / f"{name}.png")
    (curve if args.kind == "curve" else seeds)(rows)


if __name__ == "__main__":
    main()
