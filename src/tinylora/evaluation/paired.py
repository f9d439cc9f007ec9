"""Paired comparison of two evaluations of the same problems (`tinylora eval --compare A.jsonl B.jsonl`).

Two runs scored on the same held-out problems are paired: what matters is the problems one solves and the
other does not. For each rule (the run's own and the lenient one) this gives the problems B gained and lost
against A, the exact McNemar p-value (two-sided binomial test of the discordant pairs at 1/2), and a paired
bootstrap 95% interval of B's accuracy minus A's (problems resampled with replacement, seeded).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tinylora.tasks.jsonl import json_objects

RULES = (("rule", "correct"), ("lenient", "lenient_correct"))
BOOTSTRAP_RESAMPLES = 10_000


def read_rows(path: str | Path) -> dict[int, dict]:
    """One evaluation's rows by problem index; a file with k samples per problem or a bad line is refused."""
    rows: dict[int, dict] = {}
    for lineno, row in json_objects(path, "evaluation file"):
        if "index" not in row or "correct" not in row:
            raise ValueError(f"{path}:{lineno}: not an evaluation row (needs 'index' and 'correct'; "
                             "use the eval_*.jsonl a run writes, or `tinylora eval --out`)")
        if row["index"] in rows:
            raise ValueError(f"{path}:{lineno}: a second row for problem {row['index']}: a paired comparison "
                             "needs one greedy answer per problem")
        rows[row["index"]] = row
    if not rows:
        raise ValueError(f"{path}: no evaluation rows")
    return rows


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven) under Binomial(gained + lost, 1/2)."""
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_diff(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES):
    """Percentile 95% interval of mean(b) - mean(a) over problems resampled together (paired)."""
    d = b.astype(float) - a.astype(float)  # [n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))  # [resamples, n]
    means = d[idx].mean(axis=1)  # [resamples]
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def compare(path_a: str | Path, path_b: str | Path, seed: int = 0) -> dict:
    """B against A on the problems both scored, per rule: accuracies, gained, lost, McNemar p, bootstrap CI."""
    a, b = read_rows(path_a), read_rows(path_b)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"{path_a} and {path_b} score different problems (only in A: {only_a[:5]}, only in B: "
                         f"{only_b[:5]}): a paired comparison needs the same held-out set")
    order = sorted(a)
    for i in order:
        if (a[i].get("prompt"), a[i].get("gold")) != (b[i].get("prompt"), b[i].get("gold")):
            raise ValueError(f"problem {i} differs between {path_a} and {path_b} (prompt or gold answer): "
                             "not the same held-out set")
    out = {"a": str(path_a), "b": str(path_b), "n": len(order), "seed": seed}
    for rule, key in RULES:
        if not all(key in a[i] and key in b[i] for i in order):
            continue
        xa = np.array([bool(a[i][key]) for i in order])  # [n]
        xb = np.array([bool(b[i][key]) for i in order])  # [n]
        gained, lost = int((xb & ~xa).sum()), int((xa & ~xb).sum())
        out[rule] = {"acc_a": float(xa.mean()), "acc_b": float(xb.mean()), "diff": float(xb.mean() - xa.mean()),
                     "gained": gained, "lost": lost, "mcnemar_p": mcnemar_exact(gained, lost),
                     "ci95": list(bootstrap_diff(xa, xb, seed))}
    return out


def format_comparison(c: dict) -> str:
    lines = [f"A = {c['a']}", f"B = {c['b']}", f"{c['n']} problems, paired"]
    for rule, _ in RULES:
        if rule not in c:
            continue
        r = c[rule]
        lo, hi = r["ci95"]
        label = "own rule:" if rule == "rule" else "lenient:"
        lines.append(f"{label:<9} {r['acc_a']:.1%} → {r['acc_b']:.1%} ({r['diff']:+.1%}, paired bootstrap 95% CI "
                     f"{lo:+.1%} to {hi:+.1%}); B gained {r['gained']}, lost {r['lost']}; exact McNemar "
                     f"p = {r['mcnemar_p']:.3g}")
    return "\n".join(lines)
