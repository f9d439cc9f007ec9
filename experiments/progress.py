"""Carry the study across machines: keep in git what the sweeps under OUT need to go on elsewhere.

    python experiments/progress.py save OUT [--commit]   # after runs finish, or every few minutes
    python experiments/progress.py restore OUT           # on a fresh machine, before `bash experiments/queue.sh OUT`

`save` copies each OUT/NAME/results.csv to docs/reproduction/NAME.csv (as report.py does) and the few
small files a run cut off mid-way resumes from (checkpoint, metrics, base evaluation, time spent; before
its first step, the base evaluation alone) to experiments/progress/NAME/RUN/, and those of a group of runs
trained together (`sweep --batched`) to experiments/progress/NAME/_batches/GROUP/; `restore` puts them back.
A sweep counts a results.csv row marked done as finished even when its folder is gone, so finished runs
are not rerun, and a run cut off resumes from its last saved step. Checkpoints over 1 MB (LoRA, full
fine-tuning) are not kept: such a run restarts. Without `restore`, `queue.sh` reruns the whole study,
as a user reproducing it would. A finished run's adapter (when small: TinyLoRA's few numbers) and its per-problem
evaluations (base, final) go to docs/reproduction/trained/NAME/RUN/, so later controls (`tinylora eval
--random-direction`) and paired comparisons (`tinylora eval --compare`) need no rerun.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from tinylora.study.results import read_results

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "reproduction"
KEPT = REPO / "experiments" / "progress"
# an evaluation resumes by batch; the base's per-problem rows pair the final evaluation without scoring it again
RESUME_FILES = ("run.json", "checkpoint.safetensors", "metrics.jsonl", "eval_base.json", "eval_base.jsonl",
                "time_spent.json", "eval_base.jsonl.partial", "eval_final.jsonl.partial")
GROUP_FILES = ("checkpoint.safetensors", "metrics.jsonl")  # a batched group's (its plan is rewritten by the sweep)
BATCHES = "_batches"  # experiments/progress/SWEEP/_batches/GROUP: no run of a spec is named so
MAX_CHECKPOINT = 1 << 20
FINISHED_FILES = ("adapter.safetensors", "eval_base.jsonl", "eval_final.jsonl")  # identical copies: one git blob
MAX_ADAPTER = 64 << 10  # TinyLoRA's files are under 1 KB; a LoRA's adapter is not kept, its evaluation is


def _done_runs(results: Path) -> set[str]:
    return {name for name, row in read_results(results).items() if row.get("status") == "done"}


def save(out: Path, docs: Path = DOCS, kept_root: Path = KEPT) -> list[str]:
    """Copy results and in-flight runs into the repository; return what changed, for the commit message."""
    changed = []
    for results in sorted(out.glob("*/results.csv")):
        name = results.parent.name
        docs_csv = docs / f"{name}.csv"
        if not docs_csv.is_file() or docs_csv.read_bytes() != results.read_bytes():
            docs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(results, docs_csv)
            changed.append(f"{name}: {len(_done_runs(results))} runs done")
    done = {d.name: _done_runs(d / "results.csv") for d in out.glob("*/")}
    for run_dir in sorted(out.glob("*/runs/*/")):
        name = run_dir.parent.parent.name
        kept = kept_root / name / run_dir.name
        ckpt = run_dir / "checkpoint.safetensors"
        # resumable here: a small checkpoint, or before the first step a base evaluation, whole or part way
        # (GSM8K at 1.5B: most of an hour)
        base_eval_started = any((run_dir / f).is_file() for f in ("eval_base.json", "eval_base.jsonl.partial"))
        small = ckpt.stat().st_size <= MAX_CHECKPOINT if ckpt.is_file() else base_eval_started
        if _mirror(run_dir, kept, RESUME_FILES, keep=run_dir.name not in done[name] and small):
            changed.append(f"{name}/{run_dir.name} in flight")
        if run_dir.name in done[name] and _keep_finished(run_dir, docs / "trained" / name / run_dir.name):
            changed.append(f"{name}/{run_dir.name} kept")
    for group in sorted(out.glob("*/batches/*/")):  # `sweep --batched`: a group's checkpoint until it is done
        name = group.parent.parent.name
        kept = kept_root / name / BATCHES / group.name
        ckpt = group / "checkpoint.safetensors"
        if _mirror(group, kept, GROUP_FILES, keep=ckpt.is_file() and ckpt.stat().st_size <= MAX_CHECKPOINT):
            changed.append(f"{name}/batches/{group.name} in flight")
    return changed


def _keep_finished(run_dir: Path, kept: Path) -> bool:
    """Copy a finished run's small adapter and its per-problem evaluations (base, final) once; whether anything
    was copied."""
    files = [f for f in FINISHED_FILES if (run_dir / f).is_file() and not (kept / f).is_file()
             and not (f.endswith(".safetensors") and (run_dir / f).stat().st_size > MAX_ADAPTER)]
    for f in files:
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / f, kept / f)
    return bool(files)


def _mirror(src: Path, kept: Path, files: tuple[str, ...], keep: bool) -> bool:
    """Copy `files` of `src` that changed into `kept` and drop those `src` no longer has (an evaluation's part
    once it is whole) (keep), or drop `kept` (not keep); whether anything was copied."""
    if not keep:
        if kept.exists():
            shutil.rmtree(kept)
        return False
    kept.mkdir(parents=True, exist_ok=True)
    copied = [f for f in files if (src / f).is_file() and (
        not (kept / f).is_file() or (kept / f).read_bytes() != (src / f).read_bytes())]
    for f in copied:
        shutil.copyfile(src / f, kept / f)
    for f in files:
        if not (src / f).is_file():
            (kept / f).unlink(missing_ok=True)
    return bool(copied)


def restore(out: Path, docs: Path = DOCS, kept_root: Path = KEPT) -> None:
    for docs_csv in sorted(docs.glob("*.csv")):
        results = out / docs_csv.stem / "results.csv"
        if not results.is_file():
            results.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(docs_csv, results)
            print(f"{results}: {len(_done_runs(results))} finished runs, from {docs_csv}")
    for kept in sorted(kept_root.glob(f"*/{BATCHES}/*/")):
        group = out / kept.parent.parent.name / "batches" / kept.name
        if not (group / "checkpoint.safetensors").is_file():
            group.mkdir(parents=True, exist_ok=True)
            for f in kept.iterdir():
                shutil.copyfile(f, group / f.name)
            print(f"{group}: resumes from {kept}")
    for kept in sorted(kept_root.glob("*/*/")):
        if kept.name == BATCHES:
            continue
        run_dir = out / kept.parent.name / "runs" / kept.name
        if (run_dir / "checkpoint.safetensors").is_file() or (run_dir / "summary.json").is_file():
            continue  # this machine has its own, newer or equal
        run_dir.mkdir(parents=True, exist_ok=True)
        for f in kept.iterdir():
            shutil.copyfile(f, run_dir / f.name)
        print(f"{run_dir}: resumes from {kept}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("out", type=Path, help="the folder of sweeps given to experiments/queue.sh")
    p.add_argument("--commit", action="store_true", help="save: commit what changed (only these paths)")
    args = p.parse_args()
    if args.action == "restore":
        restore(args.out)
        return
    changed = save(args.out)
    print("\n".join(changed) or "nothing new")
    if changed and args.commit:
        tracked = subprocess.run(["git", "ls-files", "--", str(KEPT)], cwd=REPO, capture_output=True, text=True).stdout
        paths = [str(p.relative_to(REPO)) for p in (DOCS, KEPT) if p.exists() or (p == KEPT and tracked)]
        subprocess.run(["git", "add", "-A", "--", *paths], cwd=REPO, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "Progress: " + "; ".join(changed), "--", *paths],
                       cwd=REPO, check=True)


if __name__ == "__main__":
    main()
