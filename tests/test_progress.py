"""experiments/progress.py: a sweep killed on one machine goes on from git's copy on another."""

import importlib.util
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_sweep import model_dir, read_csv, sweep_cmd, write_spec  # noqa: F401  (model_dir: a fixture)
from waiting import HANG_GUARD_S, line_count, running, wait_until

from tinylora.study.results import TIME_COLUMNS

_spec = importlib.util.spec_from_file_location(
    "progress", Path(__file__).resolve().parent.parent / "experiments" / "progress.py")
progress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(progress)


@pytest.mark.slow
def test_a_sweep_killed_on_one_machine_finishes_on_another_from_the_saved_files(model_dir, tmp_path):  # noqa: F811
    spec = write_spec(tmp_path, model_dir, steps=12, extra="eval-every = 6")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(sweep_cmd(spec, tmp_path / "whole" / "s"), env=env, check=True, capture_output=True)

    first = tmp_path / "first"  # machine one: killed in the middle of the second run
    proc = subprocess.Popen(sweep_cmd(spec, first / "s"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = first / "s" / "runs" / "n-tie=1" / "metrics.jsonl"
    wait_until(lambda: line_count(metrics) >= 8, running(proc), "8 metrics lines in runs/n-tie=1")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    assert 8 <= len(metrics.read_text().splitlines()) < 12, "the kill was meant to land after the mid-run evaluation"
    docs, kept = tmp_path / "repo" / "docs", tmp_path / "repo" / "progress"
    progress.save(first, docs, kept)
    assert (docs / "s.csv").is_file()
    assert sorted(p.name for p in (kept / "s").iterdir()) == ["n-tie=1"]  # the finished run needs nothing more
    assert (kept / "s" / "n-tie=1" / "checkpoint.safetensors").stat().st_size < 10_000
    shutil.rmtree(first)

    second = tmp_path / "second"  # machine two: only what was saved
    progress.restore(second, docs, kept)
    out = subprocess.run(sweep_cmd(spec, second / "s"), env=env, check=True, capture_output=True, text=True).stdout
    assert "2 runs, 1 finished, 1 to run" in out
    assert not (second / "s" / "runs" / "n-tie=all").exists()  # not rerun
    assert "resuming from" in (second / "s" / "runs" / "n-tie=1" / "train.log").read_text()

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]
    whole = tmp_path / "whole"
    assert comparable(read_csv(second / "s" / "results.csv")) == comparable(read_csv(whole / "s" / "results.csv"))
    a, b = (load_file(str(d / "s" / "runs" / "n-tie=1" / "adapter.safetensors"))["v"] for d in (second, whole))
    assert a.equal(b)
    progress.save(second, docs, kept)  # finished: its saved checkpoint goes
    assert not list(kept.glob("*/*/"))
    assert docs.joinpath("s.csv").read_bytes() == (second / "s" / "results.csv").read_bytes()


def test_a_run_cut_off_before_its_first_step_keeps_its_base_evaluation(tmp_path):
    run = tmp_path / "first" / "s" / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text('{"name": "r"}')
    (run / "eval_base.json").write_text('{"accuracy": 0.25}')  # minutes of work on GSM8K
    docs, kept = tmp_path / "docs", tmp_path / "kept"
    assert progress.save(tmp_path / "first", docs, kept) == ["s/r in flight"]
    assert progress.save(tmp_path / "first", docs, kept) == []  # nothing new
    progress.restore(tmp_path / "second", docs, kept)
    assert (tmp_path / "second" / "s" / "runs" / "r" / "eval_base.json").read_text() == '{"accuracy": 0.25}'
    (run / "eval_base.json").unlink()  # nothing left to resume from: the saved copy goes
    progress.save(tmp_path / "first", docs, kept)
    assert not kept.joinpath("s", "r").exists()


def test_a_batched_group_cut_off_keeps_its_checkpoint_until_it_is_done(tmp_path):
    group = tmp_path / "first" / "s" / "batches" / "abc123"
    group.mkdir(parents=True)
    (group / "checkpoint.safetensors").write_bytes(b"v and AdamW of every run")
    (group / "metrics.jsonl").write_text('{"step": 0}\n')
    (group / "plan.json").write_text('{"dir": "/home/someone/runs"}')  # rewritten by the sweep: not kept
    docs, kept = tmp_path / "docs", tmp_path / "kept"
    assert progress.save(tmp_path / "first", docs, kept) == ["s/batches/abc123 in flight"]
    saved = kept / "s" / progress.BATCHES / "abc123"
    assert sorted(p.name for p in saved.iterdir()) == ["checkpoint.safetensors", "metrics.jsonl"]
    progress.restore(tmp_path / "second", docs, kept)
    again = tmp_path / "second" / "s" / "batches" / "abc123"
    assert (again / "checkpoint.safetensors").read_bytes() == b"v and AdamW of every run"
    assert not (tmp_path / "second" / "s" / "runs" / progress.BATCHES).exists()  # not taken for a run
    (group / "checkpoint.safetensors").unlink()  # the sweep deletes it once every run of the group is done
    progress.save(tmp_path / "first", docs, kept)
    assert not saved.exists()


def test_a_finished_run_keeps_its_small_adapter_and_final_evaluation_beside_the_csv(tmp_path):
    out = tmp_path / "first"
    (out / "s").mkdir(parents=True)
    (out / "s" / "results.csv").write_text("name,status\ntiny,done\nlora,done\nrunning,\n")
    for name, adapter in (("tiny", b"v" * 800), ("lora", b"A" * (progress.MAX_ADAPTER + 1)), ("running", b"v")):
        run = out / "s" / "runs" / name
        run.mkdir(parents=True)
        (run / "adapter.safetensors").write_bytes(adapter)
        (run / "eval_final.jsonl").write_text(f'{{"index": 0, "correct": true, "run": "{name}"}}\n')
        (run / "metrics.jsonl").write_text("{}\n")
    docs, kept = tmp_path / "docs", tmp_path / "kept"
    assert "s/tiny kept" in progress.save(out, docs, kept)
    runs = docs / "trained" / "s"
    assert sorted(p.name for p in runs.iterdir()) == ["lora", "tiny"]  # the unfinished run: nothing yet
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["adapter.safetensors", "eval_final.jsonl"]
    assert (runs / "tiny" / "adapter.safetensors").read_bytes() == b"v" * 800
    assert sorted(p.name for p in (runs / "lora").iterdir()) == ["eval_final.jsonl"]  # too big to commit
    assert progress.save(out, docs, kept) == []  # copied once


def test_an_evaluation_cut_off_part_way_is_kept_and_comes_back(tmp_path):
    """GSM8K's evaluations at 1.5B take most of an hour: the rows written so far (`.partial`, which
    `evaluate` resumes from) go to git with the run, and leave it once the evaluation is whole."""
    run = tmp_path / "first" / "s" / "runs" / "lr=0.01"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "eval_base.jsonl.partial").write_text('{"key": 1}\n{"problem": 0}\n')
    (tmp_path / "first" / "s" / "results.csv").write_text("name,status\nlr=0.01,pending\n")
    docs, kept = tmp_path / "repo" / "docs", tmp_path / "repo" / "progress"
    assert progress.save(tmp_path / "first", docs, kept) == ["s: 0 runs done", "s/lr=0.01 in flight"]
    assert sorted(p.name for p in (kept / "s" / "lr=0.01").iterdir()) == ["eval_base.jsonl.partial", "run.json"]

    progress.restore(tmp_path / "second", docs, kept)
    back = tmp_path / "second" / "s" / "runs" / "lr=0.01" / "eval_base.jsonl.partial"
    assert back.read_text() == '{"key": 1}\n{"problem": 0}\n'

    (run / "eval_base.jsonl.partial").unlink()  # the evaluation finished: its rows and summary replace the part
    (run / "eval_base.jsonl").write_text('{"problem": 0}\n{"problem": 1}\n')
    (run / "eval_base.json").write_text('{"acc": 0.5}')
    progress.save(tmp_path / "first", docs, kept)
    assert sorted(p.name for p in (kept / "s" / "lr=0.01").iterdir()) == ["eval_base.json", "eval_base.jsonl",
                                                                          "run.json"]
    progress.restore(tmp_path / "third", docs, kept)  # the final evaluation can be paired with these rows there
    third = tmp_path / "third" / "s" / "runs" / "lr=0.01" / "eval_base.jsonl"
    assert third.read_text() == '{"problem": 0}\n{"problem": 1}\n'
