"""The random-direction control: is a gain the trained direction of v, or any nudge of that size?

Each trained adapter's v is replaced by seeded random vectors of the same norm (`tinylora eval
--random-direction SEED`), scored on the run's own held-out problems, and compared, paired, with the trained
v (the same problems: `tinylora eval --compare`). A run is a folder docs/reproduction/trained/SWEEP/RUN (its
adapter and final evaluation, kept by experiments/progress.py); its settings come from
docs/reproduction/SWEEP.csv.

    python experiments/random_direction.py RUN_DIR [RUN_DIR ...] [--seeds 0 1 2]

Each evaluation is written beside the run (eval_random_direction_SEED.jsonl) and one row per (run, seed) is
appended to docs/reproduction/trained/random_direction.csv as it finishes; rerunning skips the rows already there.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

from tinylora.api import DataConfig, ModelConfig, evaluate
from tinylora.evaluation.paired import compare
from tinylora.study.results import read_results

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "reproduction"
OUT = Path("trained") / "random_direction.csv"  # under the docs folder; not a sweep's CSV (progress.py)
DEFAULT_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
COLUMNS = ["sweep", "run", "model", "seed", "v_norm", "acc", "lenient", "trained_acc", "trained_lenient",
           "gained", "lost", "mcnemar_p", "lenient_gained", "lenient_lost", "lenient_mcnemar_p"]


def settings(run_dir: Path, docs: Path = DOCS) -> dict:
    """The run's results.csv row (model, levels, eval-n, max-new-tokens)."""
    csv_path = docs / f"{run_dir.parent.name}.csv"
    row = read_results(csv_path).get(run_dir.name)
    if row is None or row.get("status") != "done":
        raise ValueError(f"{run_dir}: no finished run {run_dir.name!r} in {csv_path}")
    return row


def control(run_dir: Path, seed: int, docs: Path = DOCS) -> dict:
    """Evaluate the run's adapter with a random direction of its norm; its CSV row."""
    row = settings(run_dir, docs)
    model = row.get("model") or DEFAULT_MODEL
    out = run_dir / f"eval_random_direction_{seed}.jsonl"
    scratch = Path(tempfile.mkdtemp()) / out.name  # written elsewhere, so git never sees a partial file
    result = evaluate(ModelConfig(model=model), DataConfig(levels=row["levels"], eval_n=int(row["eval-n"])),
                      adapter=str(run_dir / "adapter.safetensors"), split="test", n=int(row["eval-n"]),
                      max_new_tokens=int(row["max-new-tokens"]), random_direction=seed, out=str(scratch),
                      progress=False)
    shutil.move(scratch, out)
    c = compare(run_dir / "eval_final.jsonl", out)  # B = the random direction, A = the trained v
    strict, lenient = c["rule"], c["lenient"]
    return {"sweep": run_dir.parent.name, "run": run_dir.name, "model": model, "seed": seed,
            "v_norm": f"{result['v_norm']:.6g}", "acc": strict["acc_b"], "lenient": lenient["acc_b"],
            "trained_acc": strict["acc_a"], "trained_lenient": lenient["acc_a"],
            "gained": strict["gained"], "lost": strict["lost"], "mcnemar_p": f"{strict['mcnemar_p']:.3g}",
            "lenient_gained": lenient["gained"], "lenient_lost": lenient["lost"],
            "lenient_mcnemar_p": f"{lenient['mcnemar_p']:.3g}"}


def run_controls(runs: list[Path], seeds: list[int], docs: Path = DOCS) -> list[dict]:
    """Every (run, seed) not yet in docs/reproduction/trained/random_direction.csv, appended as each finishes;
    the new rows."""
    out, done, rows = docs / OUT, set(), []
    if out.is_file():
        with open(out, newline="") as f:
            done = {(r["sweep"], r["run"], int(r["seed"])) for r in csv.DictReader(f)}
    for run_dir in runs:
        for seed in seeds:
            if (run_dir.parent.name, run_dir.name, seed) in done:
                continue
            row = control(run_dir, seed, docs)
            rows.append(row)
            new = not out.is_file()
            with open(out, "a", newline="") as f:  # one whole line per finished evaluation
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(row)
            print(f"{row['sweep']}/{row['run']} seed {seed}: {100 * row['acc']:.1f}% strict, "
                  f"{100 * row['lenient']:.1f}% lenient (trained v {100 * row['trained_acc']:.1f}%, "
                  f"{100 * row['trained_lenient']:.1f}%); {row['gained']} gained, {row['lost']} lost, "
                  f"p = {row['mcnemar_p']}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="docs/reproduction/trained/SWEEP/RUN folders")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = p.parse_args()
    run_controls(args.runs, args.seeds)


if __name__ == "__main__":
    main()
