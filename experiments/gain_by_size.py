"""How much of the rank-1 LoRA gain each count of trained numbers recovers, per model size and algorithm: the
table behind "bigger models need fewer parameters".

    python experiments/gain_by_size.py docs/reproduction/param_curve.csv docs/reproduction/scale.csv \
        docs/reproduction/scale_curve.csv --same-pool scale scale_curve

For each (model, algorithm): the base; for every sweep, method and count of trained numbers, the best final
accuracy over the learning rates tried on seed 0 (20 steps; control rewards left out); the fraction of the
gain of rank-1 LoRA at its best rate (of any sweep), (accuracy - base) / (LoRA's accuracy - base), strict and
lenient; and the fraction of the gain of the same sweep's TinyLoRA with one number per module (u = 1,
n_tie = 1: 168 numbers at 0.5B, 196 at 1.5B), the top of the tiny curve. Sweeps are kept apart, since their
training pools, and so data orders, may differ, except those named together by --same-pool. Rates are picked
on the evaluation problems themselves, so every cell leans upward alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tinylora.study.results import read_results

DEFAULT_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
REFERENCE = ("lora", 1)  # (method, r): the top of the curve at both sizes (full fine-tuning does not fit 24 GB at 1.5B)


def eligible(row: dict) -> bool:
    """A finished seed-0 run of the curve's budget, trained for correctness (no control reward)."""
    return (row.get("status") == "done" and (row.get("seed") or "0") == "0" and row.get("steps") == "20"
            and (row.get("reward") or "strict") == "strict" and not row.get("dynamic-sampling"))


def per_module(row: dict) -> bool:
    """TinyLoRA with u = 1 and n_tie = 1: one trained number per adapted module."""
    return ((row.get("method") or "tinylora") == "tinylora" and row.get("n-tie") == "1"
            and (row.get("u") or "1") == "1")


def best_runs(rows: list[dict]) -> dict[tuple, dict]:
    """(model, algo, method, r, trained numbers, sweep) -> the run with the best final strict accuracy over its
    rates; each row names its sweep under "sweep"."""
    best: dict[tuple, dict] = {}
    for row in filter(eligible, rows):
        method = row.get("method") or "tinylora"
        r = int(row["r"]) if row.get("r") and method == "lora" else None
        key = (row.get("model") or DEFAULT_MODEL, row["algo"], method, r, int(row["trainable_params"]), row["sweep"])
        if key not in best or float(row["final_acc"]) > float(best[key]["final_acc"]):
            best[key] = row
    return best


def fraction(acc: float, base: float, reference: float) -> float | None:
    """(acc - base) / (reference - base); None when the reference gained nothing."""
    return (acc - base) / (reference - base) if reference > base else None


def table(best: dict[tuple, dict]) -> list[dict]:
    """One row per (model, algo, method, numbers), with its fraction of the reference's gain."""
    refs = {key[:2]: row for key, row in best.items() if key[2:4] == REFERENCE}  # (model, algo) -> LoRA r=1
    tops = {(k[0], k[1], k[5]): row for k, row in best.items() if per_module(row)}  # (model, algo, sweep) -> n_tie=1
    out = []
    for key in sorted(best, key=lambda k: (k[0], k[1], k[4])):
        model, algo, method, r, numbers, sweep = key
        row, ref, top = best[key], refs.get((model, algo)), tops.get((model, algo, sweep))
        line = {"model": model, "algo": algo, "method": method if r is None else f"{method} r={r}",
                "numbers": numbers, "lr": row["lr"], "sweep": sweep}
        for rule, acc_key, base_key in (("strict", "final_acc", "base_acc"),
                                        ("lenient", "final_lenient", "base_lenient")):
            acc, base = float(row[acc_key]), float(row[base_key])
            line[rule], line[f"{rule}_base"] = acc, base
            line[f"{rule}_of_ref"] = fraction(acc, base, float(ref[acc_key])) if ref else None
            line[f"{rule}_of_top"] = fraction(acc, base, float(top[acc_key])) if top else None
        out.append(line)
    return out


def read_sweeps(csvs: list[Path], same_pool: list[list[str]] = ()) -> list[dict]:
    """Every row of the sweeps' CSVs, each naming its sweep (NAME of NAME.csv; sweeps trained on one pool, as
    `same_pool` groups them, under one joined name)."""
    pooled = {name: "+".join(group) for group in same_pool for name in group}
    return [{**r, "sweep": pooled.get(path.stem, path.stem)} for path in csvs for r in read_results(path).values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="+", type=Path, help="sweeps' results.csv files (docs/reproduction/NAME.csv)")
    p.add_argument("--same-pool", nargs="+", action="append", default=[], metavar="SWEEP",
                   help="sweeps that train on the same pool, compared as one (e.g. scale_curve continues scale)")
    args = p.parse_args()
    missing = [str(p) for p in args.csvs if not p.is_file()]
    if missing:  # a sweep that has no results yet (the 1.5B curve while it runs)
        print(f"no results yet, left out: {', '.join(missing)}\n")
    rows = read_sweeps([path for path in args.csvs if path.is_file()], args.same_pool)

    def cell(x):
        return "–" if x is None else f"{100 * x:.0f}%"
    print("| model | algo | method | trained numbers | sweep | best lr | strict (base) | of LoRA r=1's gain "
          "| of n_tie=1's gain | lenient (base) | of LoRA r=1's gain | of n_tie=1's gain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table(best_runs(rows)):
        print(f"| {t['model'].removeprefix('embedded:')} | {t['algo'].upper()} | {t['method']} | {t['numbers']:,} | "
              f"{t['sweep']} | {float(t['lr']):g} | {100 * t['strict']:.1f} ({100 * t['strict_base']:.1f}) | "
              f"{cell(t['strict_of_ref'])} | {cell(t['strict_of_top'])} | "
              f"{100 * t['lenient']:.1f} ({100 * t['lenient_base']:.1f}) | {cell(t['lenient_of_ref'])} | "
              f"{cell(t['lenient_of_top'])} |")


if __name__ == "__main__":
    main()
