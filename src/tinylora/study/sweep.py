"""`tinylora sweep SPEC --out DIR`: many `tinylora train` runs from one small TOML file, resumable.

    [shared]                       # options of every run: `tinylora train` flags without the dashes
    steps = 20
    eval-n = 200

    [[run]]                        # a group of runs; a list expands into one run per element,
    algo = "grpo"                  # several lists into their grid (the first list varies slowest)
    n-tie = ["all", 16, 1]
    lr = [3e-3, 1e-2]

Each run is its own `tinylora train --resume` process in DIR/runs/NAME/ (NAME: the options that vary
across the sweep), so a failed run (bad value, out of memory) is recorded with its error and the sweep
goes on, and an interrupted one continues from its last checkpoint: Ctrl-C or kill -9 loses at most the
step in flight. Finished runs are skipped, also when only DIR/results.csv survives, and keep all but their
checkpoint. After every run DIR/results.csv (one row per run) and DIR/accuracy_vs_params.png are rewritten.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tinylora.atomic import atomic_write_text
from tinylora.methods import method_of
from tinylora.study.batched import groups as batch_groups
from tinylora.study.results import RESULT_COLUMNS, read_results, result_row, write_results
from tinylora.study.spec import Run, TrainParser, load_spec

# options that change what the base model's evaluation produces: runs that agree on all of them share it
EVAL_KEYS = ("model", "dtype", "device", "task", "data", "eval_data", "prompt_template", "gsm8k_dir", "levels",
             "eval_n", "eval_batch_size", "max_new_tokens", "suffix", "system", "reward", "algo", "rollout_weights")


# ---- one run -------------------------------------------------------------------------------------
def eval_key(run: Run) -> str:
    a = run.args
    full = method_of(a.method).trains_base  # generates with merged weights, not a packed copy: another summation order
    values = [(a.eval_reward or a.reward) if k == "reward" else getattr(a, k) for k in EVAL_KEYS]  # the scoring rule
    return json.dumps(values + [full])


def summary_of(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def is_done(run: Run, run_dir: Path) -> bool:
    s = summary_of(run_dir)
    return bool(s) and not s.get("stopped_early") and s.get("steps", 0) >= run.args.steps \
        and (run.args.eval_n == 0 or s.get("final_eval") is not None)


try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here, not between fork and exec
except OSError:  # not Linux: no parent-death signal, the child may outlive a killed sweep
    _LIBC = None


def _child_setup(parent: int) -> None:
    """In the child, before exec. SIGINT is the sweep's stop request, so the child must take it even when
    the sweep itself ignores it (a script's `tinylora sweep ... &` starts with SIGINT ignored, and an
    ignored signal stays ignored across exec). Linux sends the child SIGKILL when the sweep dies, even by
    kill -9 (no orphaned training)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(1)


def run_one(run: Run, run_dir: Path, label: str, progress: bool) -> tuple[int, str]:
    """Train one run to completion (resuming its checkpoint); (exit code, last error line)."""
    cmd = [sys.executable, "-m", "tinylora", "train", *run.argv, "--out", str(run_dir), "--resume"]
    if not progress:
        cmd.append("--no-progress")
    return _child(cmd, run_dir / "train.log", label)


def group_dir(group: list[Run], out: Path) -> Path:
    """Where a group trained together keeps its checkpoint and metrics: OUT/batches/HASH of its run names."""
    return out / "batches" / hashlib.sha256("\0".join(r.name for r in group).encode()).hexdigest()[:12]


def run_group(group: list[Run], out: Path, label: str, progress: bool) -> tuple[int, str]:
    """Train a group of runs together (study.batched), each into its own folder; (exit code, last error)."""
    d = group_dir(group, out)
    d.mkdir(parents=True, exist_ok=True)
    plan = {"dir": str(d), "runs": [{"name": r.name, "argv": r.argv, "dir": str(out / "runs" / r.name)} for r in group]}
    atomic_write_text(d / "plan.json", json.dumps(plan, indent=1))
    cmd = [sys.executable, "-m", "tinylora.study.batched", str(d / "plan.json")] + (["--progress"] if progress else [])
    return _child(cmd, d / "train.log", label)


def _child(cmd: list[str], log_path: Path, label: str) -> tuple[int, str]:
    env = {**os.environ, "TINYLORA_PROGRESS_LABEL": label}
    with open(log_path, "ab") as log:
        # its own session: a terminal's Ctrl-C reaches only the sweep, which passes it on once
        parent = os.getpid()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, env=env, start_new_session=True,
                                preexec_fn=lambda: _child_setup(parent))
        tail = bytearray()

        def relay():  # the child's progress bars and errors: shown live, the end kept for the error
            while chunk := os.read(proc.stderr.fileno(), 4096):
                tail.extend(chunk)
                del tail[:-8192]
                for sink in (getattr(sys.stderr, "buffer", None), log):
                    try:  # a closed or missing stderr must not stop the draining (the child would block)
                        sink.write(chunk)
                        sink.flush()
                    except (AttributeError, OSError, ValueError):
                        pass
        reader = threading.Thread(target=relay, daemon=True)
        reader.start()

        def forward(signum, frame):
            proc.send_signal(signal.SIGINT)  # the trainer finishes its step and saves (twice: stops at once)
            _stop.set()
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        reader.join(timeout=10)
    return rc, _error_line(rc, tail.decode(errors="replace"))


def _error_line(rc: int, stderr: str) -> str:
    if rc == 0:
        return ""
    if rc < 0:
        name = signal.Signals(-rc).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    lines = [x.strip() for x in re.split(r"[\r\n]", stderr) if x.strip()]
    for line in reversed(lines):
        if line.startswith("tinylora train: error:"):
            return line[len("tinylora train: error:"):].strip()
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return f"exit code {rc}" + (f": {lines[-1]}" if lines else "")


_stop = threading.Event()  # set by Ctrl-C / SIGTERM: no new run starts


def _duration(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


# ---- the sweep -----------------------------------------------------------------------------------
def run_sweep(spec: str | Path, out: str | Path, *, progress: bool = True, dry_run: bool = False,
              only: str | None = None, batched: bool = False) -> list[dict]:
    """Run every run of `spec` not yet finished under `out` (with `only`: those whose name the regular
    expression matches; the rest are left as they are); return the rows of results.csv. `batched`: runs that
    differ only in per-adapter settings train together (study.batched)."""
    from tinylora.study.plots import plot_sweep
    runs = load_spec(spec)
    out = Path(out)
    try:
        chosen = {r.name for r in runs if only is None or re.search(only, r.name)}
    except re.error as e:
        raise ValueError(f"--only {only!r}: not a regular expression ({e})") from None
    if not chosen:
        raise ValueError(f"--only {only!r} matches none of the runs of {spec}: "
                         + ", ".join(r.name for r in runs))
    # options as written; algo, method and steps get their own (resolved) result columns
    option_keys = [k for k in dict.fromkeys(k for r in runs for k in r.options) if k not in RESULT_COLUMNS]
    if dry_run:
        for group in (batch_groups if batched else lambda rs: [[r] for r in rs])([r for r in runs if r.name in chosen]):
            for r in group:
                print(f"{r.name}: tinylora train {' '.join(r.argv)}")
            if len(group) > 1:
                print(f"  (the {len(group)} runs above train together)")
        return []
    (out / "runs").mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"another `tinylora sweep` is running in {out}") from None
    results_path = out / "results.csv"
    earlier = {row.get("run_key"): row for row in read_results(results_path).values()}
    parser = TrainParser()
    _adopt_renamed_runs(runs, out, parser)
    rows: dict[str, dict] = {}
    todo = []
    for r in runs:
        d = out / "runs" / r.name
        made = d / "run.json"
        if made.is_file() and not _same_flags(_made_with(made), r.argv, parser):
            raise ValueError(f"{d} was made with other options than the spec now gives run {r.name!r}; "
                             "delete or rename that folder to rerun it")
        if is_done(r, d):
            rows[r.name] = result_row(r, "done", "", summary_of(d), option_keys, d)
        elif earlier.get(r.key, {}).get("status") == "done" and not d.exists():
            rows[r.name] = {**earlier[r.key], "name": r.name}  # finished in a sitting whose folders are gone
        else:
            rows[r.name] = result_row(r, "pending", "", None, option_keys)
            if r.name in chosen:
                todo.append(r)
    def say(*a):
        print(*a, flush=True)  # before the child writes its own lines
    finished = sum(row["status"] == "done" for row in rows.values())
    later = f", {len(runs) - finished - len(todo)} left for later (--only)" if only is not None else ""
    say(f"sweep {spec}: {len(runs)} runs, {finished} finished, {len(todo)} to run{later} (out: {out})")
    durations: list[float] = []  # per run
    _stop.clear()
    started = 0
    for group in batch_groups(todo) if batched else [[r] for r in todo]:
        if _stop.is_set():
            break
        eta = f" ETA {_duration(sum(durations) / len(durations) * (len(todo) - started))}" if durations else ""
        label = f"[{finished + started + 1}/{len(runs)}{eta}] "
        started += len(group)
        for r in group:
            d = out / "runs" / r.name
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "run.json", json.dumps({"name": r.name, "options": r.options, "argv": r.argv},
                                                         indent=1))
            _share_base_eval(r, d, runs, out)
        t0 = time.time()
        if len(group) == 1:
            say(f"{label}{group[0].name}")
            rc, err = run_one(group[0], out / "runs" / group[0].name, label, progress)
        else:
            say(f"{label}{len(group)} runs trained together: {', '.join(r.name for r in group)}")
            rc, err = run_group(group, out, label, progress)
            if all(is_done(r, out / "runs" / r.name) for r in group):
                (group_dir(group, out) / "checkpoint.safetensors").unlink(missing_ok=True)  # only for resuming
        for r in group:
            d = out / "runs" / r.name
            if is_done(r, d):
                durations.append((time.time() - t0) / len(group))
                (d / "checkpoint.safetensors").unlink(missing_ok=True)  # only for resuming: GBs in full fine-tuning
                rows[r.name] = result_row(r, "done", "", summary_of(d), option_keys, d)
                say(f"{label}{r.name}: done, {_accuracies(rows[r.name])}")
            elif _stop.is_set():
                say(f"{label}{r.name}: interrupted; rerun the same command to continue from its checkpoint")
            else:
                rows[r.name] = result_row(r, "failed", err or f"exit code {rc}", summary_of(d), option_keys, d)
                say(f"{label}{r.name}: FAILED: {rows[r.name]['error']}")
        ordered = [rows[x.name] for x in runs]
        write_results(results_path, ordered, option_keys)
        plot_sweep(ordered, out / "accuracy_vs_params.png")
    ordered = [rows[x.name] for x in runs]
    write_results(results_path, ordered, option_keys)
    plot_sweep(ordered, out / "accuracy_vs_params.png")
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "failed", "pending")}
    say(f"sweep: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending → {results_path}")
    lock.close()
    if _stop.is_set():
        raise KeyboardInterrupt  # the CLI exits with 130: rerun the same command to continue
    return ordered


def _flags(argv: list[str], parser: TrainParser) -> str:
    """What a run is: its train flags parsed, defaults filled in, so their order in a spec does not matter."""
    return json.dumps(vars(parser.parse_args(argv)), sort_keys=True, default=str)


def _same_flags(made: list[str] | None, argv: list[str], parser: TrainParser) -> bool:
    if made is None:
        return False
    try:
        return made == argv or _flags(made, parser) == _flags(argv, parser)
    except ValueError:  # flags this version no longer knows
        return False


def _made_with(run_json: Path) -> list[str] | None:
    try:
        return json.loads(run_json.read_text())["argv"]
    except (OSError, ValueError, KeyError):
        return None


def _adopt_renamed_runs(runs: list[Run], out: Path, parser: TrainParser) -> None:
    """A run is its options, not its name: names change when the spec grows a new varying option, so a
    folder made with the same train flags under another name is renamed, not run again."""
    by_flags = {}
    for made in (out / "runs").glob("*/run.json"):
        argv = _made_with(made)
        if argv is not None:
            try:
                by_flags[_flags(argv, parser)] = made.parent
            except ValueError:
                continue
    for r in runs:
        d, old = out / "runs" / r.name, by_flags.get(_flags(r.argv, parser))
        if old is not None and old != d and not d.exists():
            old.rename(d)
            # what the folder's files say of it: run.json its name, summary.json its adapter file's path
            for file, key, value in (("run.json", "name", r.name),
                                     ("summary.json", "adapter_file", str(d / "adapter.safetensors"))):
                data = json.loads((d / file).read_text()) if (d / file).is_file() else {}
                if key in data:
                    (d / file).write_text(json.dumps({**data, key: value}, indent=2))


def _accuracies(row: dict) -> str:
    def pct(k):
        return f"{float(row[k]):.1%}" if row.get(k) not in (None, "") else "–"
    return (f"{pct('base_acc')} → {pct('final_acc')} ({row.get('rule')}), {pct('base_lenient')} → "
            f"{pct('final_lenient')} (lenient), {row.get('trainable_params')} numbers")


def _share_base_eval(run: Run, run_dir: Path, runs: list[Run], out: Path) -> None:
    """Copy the base model's evaluation from a run that evaluated the same thing: it is the same model,
    problems, prompt and decoding, so the numbers would be identical and cost minutes per run."""
    if (run_dir / "eval_base.json").is_file() or not run.args.eval_n:
        return
    key = eval_key(run)
    for other in runs:
        src = out / "runs" / other.name
        if other is not run and eval_key(other) == key and (src / "eval_base.json").is_file():
            for name in ("eval_base.jsonl", "eval_base.json"):  # the .json last: it marks the copy complete
                if (src / name).is_file():
                    shutil.copyfile(src / name, run_dir / name)
            return
