import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tinylora.cli.main import main
from tinylora.study.results import TIME_COLUMNS
from tinylora.study.spec import load_spec
from tinylora.study.sweep import _child_setup
from tinylora.testing import tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_spec(tmp_path, model_dir, steps=3, extra=""):
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
[shared]
model = "{model_dir}"
steps = {steps}
eval-n = 4
n = 10
batch-prompts = 2
max-new-tokens = 6
u = 2

[[run]]
n-tie = ["all", 1]
{extra}
""")
    return spec


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_spec_expands_lists_into_a_grid_and_names_runs_by_what_varies(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[shared]\nsteps = 5\n[[run]]\nlr = [0.01, 0.03]\nn-tie = ["all", 16]\n'
                    '[[run]]\nname = "sft"\nalgo = "sft"\nstd-norm = false\ntargets = "q_proj v_proj"\n')
    runs = load_spec(spec)
    assert [r.name for r in runs] == ["lr=0.01,n-tie=all", "lr=0.01,n-tie=16", "lr=0.03,n-tie=all",
                                      "lr=0.03,n-tie=16", "sft,algo=sft,std-norm=False,targets=q_proj_v_proj"]
    assert runs[0].argv == ["--steps", "5", "--lr", "0.01", "--n-tie", "all"]
    assert runs[-1].argv == ["--steps", "5", "--algo", "sft", "--no-std-norm", "--targets", "q_proj", "v_proj"]
    assert runs[-1].args.targets == ["q_proj", "v_proj"] and runs[-1].args.std_norm is False
    assert len({r.key for r in runs}) == 5


@pytest.mark.parametrize("body, message", [
    ('[[run]]\nlearning-rate = 0.1\n', "unknown option 'learning-rate'"),
    ('[[run]]\nsteps = "many"\n', "invalid int value"),
    ('[[run]]\nalgo = "ppo"\n', "invalid choice"),
    ('[[run]]\nr = 0\n', "AdapterConfig.r=0 is invalid"),
    ('[[run]]\nlr = -1.0\n', "--lr"),
    ('[[run]]\nout = "x"\n', "set by the sweep itself"),
    ('[[run]]\nlr = [0.1, 0.1]\n', "the same name as another run"),
    ('[runs]\nlr = 0.1\n', "unknown table"),
    ('[[run]\n', "not valid TOML"),
])
def test_bad_specs_fail_before_anything_runs_naming_file_and_run(tmp_path, body, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(body)
    with pytest.raises(ValueError, match=message) as e:
        load_spec(spec)
    assert "bad.toml" in str(e.value)


def sweep_cmd(spec, out):
    return [sys.executable, "-m", "tinylora", "sweep", str(spec), "--out", str(out), "--no-progress"]


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_sweep_goes_on(model_dir, tmp_path, capsys):
    broken = f'\n[[run]]\nname = "broken"\ndata = "{tmp_path}/none.jsonl"\n'  # fails when it runs
    spec = write_spec(tmp_path, model_dir, steps=2, extra=broken)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 1
    rows = {r["name"]: r for r in read_csv(out / "results.csv")}
    broken = next(r for name, r in rows.items() if name.startswith("broken"))
    assert broken["status"] == "failed" and "data file not found" in broken["error"], broken["error"]
    done = rows["n-tie=all"]
    assert done["status"] == "done" and done["trainable_params"] == "2" and done["steps"] == "2"
    for k in ("base_acc", "base_lenient", "final_acc_lo", "final_lenient_hi", "adapter_bytes", "wall_seconds"):
        assert done[k] != "", k
    # GRPO's training signal, from the run's metrics.jsonl
    metrics = [json.loads(x) for x in (out / "runs" / "n-tie=all" / "metrics.jsonl").read_text().splitlines()]
    assert float(done["train_reward_start"]) == pytest.approx(sum(m["reward_mean"] for m in metrics) / 2, abs=1e-4)
    assert float(done["zero_std_frac"]) == pytest.approx(sum(m["zero_std_frac"] for m in metrics) / 2, abs=1e-4)
    assert (out / "accuracy_vs_params.png").is_file()
    # finished runs drop the checkpoint only resuming needs (the broken run failed before its first step)
    assert (out / "runs" / "n-tie=all" / "adapter.safetensors").is_file()
    assert not list((out / "runs").glob("*/checkpoint.safetensors"))
    # the second run's base evaluation was shared, not recomputed
    summaries = [json.loads((out / "runs" / n / "summary.json").read_text()) for n in ("n-tie=all", "n-tie=1")]
    assert [s["base_eval_reused"] for s in summaries] == [False, True]
    assert summaries[0]["base_eval"] == summaries[1]["base_eval"]
    # a finished sweep reruns nothing but the failure
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 1
    assert "3 runs, 2 finished, 1 to run" in capsys.readouterr().out


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_results_as_an_uninterrupted_sweep(model_dir, tmp_path):
    spec = write_spec(tmp_path, model_dir, steps=30, extra="eval-every = 10")  # a learning curve at 10 and 20
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(sweep_cmd(spec, tmp_path / "whole"), env=env, check=True, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(sweep_cmd(spec, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = cut / "runs" / "n-tie=1" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (second.is_file() and len(second.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the sweep dies at once; its training child goes down with it
    proc.wait(timeout=30)
    steps_before = len(second.read_text().splitlines())
    assert 3 <= steps_before < 30, "the kill was meant to land in the middle of the second run"
    time.sleep(1.0)  # had the child outlived the sweep, it would still be writing
    assert len(second.read_text().splitlines()) == steps_before
    assert not (cut / "runs" / "n-tie=1" / "summary.json").exists()

    first = cut / "runs" / "n-tie=all"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()}
    out = subprocess.run(sweep_cmd(spec, cut), env=env, check=True, capture_output=True, text=True).stdout
    assert "2 runs, 1 finished, 1 to run" in out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()} == before  # untouched

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]
    whole, resumed = read_csv(tmp_path / "whole" / "results.csv"), read_csv(cut / "results.csv")
    assert comparable(resumed) == comparable(whole)
    assert all(r["status"] == "done" for r in resumed)
    assert all(re.fullmatch(r"10:[\d.]+/[\d.]+ 20:[\d.]+/[\d.]+", r["evals"]) for r in resumed), resumed
    for run in ("n-tie=all", "n-tie=1"):  # and the trained numbers themselves are equal
        a, b = (load_file(str(d / "runs" / run / "adapter.safetensors"))["v"] for d in (cut, tmp_path / "whole"))
        assert a.equal(b), run


def test_results_csv_alone_marks_runs_finished(model_dir, tmp_path, capsys):
    import shutil
    spec = write_spec(tmp_path, model_dir, steps=1)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0
    shutil.rmtree(out / "runs" / "n-tie=1")  # e.g. a new machine with only the committed results.csv
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "2 runs, 2 finished, 0 to run" in capsys.readouterr().out
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["done", "done"]


@pytest.mark.slow
def test_a_run_renamed_by_a_grown_spec_is_not_run_again(model_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, model_dir, steps=1)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0
    # a new entry with another u makes u vary, which renames every run ("n-tie=all" -> "u=2,n-tie=all")
    spec.write_text(spec.read_text() + "\n[[run]]\nn-tie = 1\nu = 3\n")
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "3 runs, 2 finished, 1 to run" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["u=2,n-tie=1", "u=2,n-tie=all", "u=3,n-tie=1"]
    summary = json.loads((out / "runs" / "u=2,n-tie=all" / "summary.json").read_text())
    assert Path(summary["adapter_file"]) == out / "runs" / "u=2,n-tie=all" / "adapter.safetensors"
    assert json.loads((out / "runs" / "u=2,n-tie=all" / "run.json").read_text())["name"] == "u=2,n-tie=all"



def test_the_same_flags_in_another_order_are_the_same_run(model_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, model_dir, steps=1)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0
    # u moves from [shared] into the run entry, before n-tie, and the default seed is spelled out
    body = spec.read_text().replace("u = 2\n", "").replace('[[run]]\n', '[[run]]\nseed = 0\nu = 2\n')
    spec.write_text(body)
    assert load_spec(spec)[0].argv[-4:] == ["--u", "2", "--n-tie", "all"]  # the flags did move
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "2 runs, 2 finished, 0 to run" in capsys.readouterr().out
    spec.write_text(body.replace("u = 2", "u = 3"))  # other flags: a folder of that name is refused
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) != 0
    assert "n-tie=all was made with other options" in capsys.readouterr().err

def test_only_runs_the_matching_runs_and_leaves_the_rest_pending(model_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, model_dir, steps=1)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress", "--only", "=1$"]) == 0
    assert "2 runs, 0 finished, 1 to run, 1 left for later (--only)" in capsys.readouterr().out
    assert {r["name"]: r["status"] for r in read_csv(out / "results.csv")} == {"n-tie=all": "pending",
                                                                                 "n-tie=1": "done"}
    assert not (out / "runs" / "n-tie=all").exists()
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0  # the rest, later
    assert "2 runs, 1 finished, 1 to run (out:" in capsys.readouterr().out
    for bad, message in (("(", "not a regular expression"), ("lr=", "matches none of the runs")):
        assert main(["sweep", str(spec), "--out", str(out), "--only", bad]) != 0
        err = capsys.readouterr().err
        assert "--only" in err and message in err, err


def test_training_child_takes_sigint_even_when_the_sweep_was_started_ignoring_it():
    # `tinylora sweep ... &` in a script starts the sweep with SIGINT ignored, and exec keeps an ignored
    # signal ignored: the child would then run through evaluations deaf to the stop the sweep forwards
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        parent = os.getpid()
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             preexec_fn=lambda: _child_setup(parent)).stdout
        ignored_without = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                         check=True).stdout
    finally:
        signal.signal(signal.SIGINT, old)
    assert ignored_without.strip() == "True"  # the probe does see an inherited ignore
    assert out.strip() == "False"


@pytest.mark.slow
def test_a_batched_sweep_trains_runs_together_and_each_ends_as_it_would_alone(tmp_path, model_dir, capsys):
    reward = tmp_path / "r.py"
    reward.write_text("def odd(completions, **kwargs):\n"
                      "    return [float(sum(map(ord, c)) % 2) for c in completions]\n")
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
[shared]
model = "{model_dir}"
steps = 3
eval-n = 4
n = 10
batch-prompts = 2
max-new-tokens = 6
u = 2
reward = "{reward}:odd"

[[run]]
seed = [0, 1]
n-tie = ["all", 4]

[[run]]
algo = "sft"
lr = [0.01, 0.03]

[[run]]
name = "alone"
dynamic-sampling = true
""")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "b"), "--batched", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "4 runs trained together: seed=0,n-tie=all" in said and "2 runs trained together" in said
    assert main(["sweep", str(spec), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    batched, solo = read_csv(tmp_path / "b" / "results.csv"), read_csv(tmp_path / "s" / "results.csv")
    assert [r["name"] for r in batched] == [r["name"] for r in solo] and len(batched) == 7
    moved = 0
    for b, s in zip(batched, solo):
        assert b["status"] == s["status"] == "done", (b["error"], s["error"])
        vb = load_file(tmp_path / "b" / "runs" / b["name"] / "adapter.safetensors")["v"]
        vs = load_file(tmp_path / "s" / "runs" / s["name"] / "adapter.safetensors")["v"]
        torch_close(vb, vs)
        moved += int(vs.abs().max() > 0)
        for k in ("trainable_params", "adapter_bytes", "base_acc", "final_acc", "train_reward_start", "rollouts"):
            assert b[k] == s[k], (b["name"], k, b[k], s[k])
    assert moved >= 5  # the comparison is of trained numbers, not of zeros
    summary = json.loads((tmp_path / "b" / "runs" / "seed=1,n-tie=4" / "summary.json").read_text())
    assert len(summary["batched_with"]) == 4


def torch_close(a, b):
    import torch
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_batched_groups_join_runs_that_differ_only_in_per_adapter_settings(tmp_path):
    from tinylora.study.batched import groups
    spec = tmp_path / "s.toml"
    spec.write_text('[shared]\nsteps = 5\n[[run]]\nseed = [0, 1]\nlr = [0.01, 0.03]\n'
                    '[[run]]\nname = "long"\nsteps = 9\nseed = [0, 1]\n'
                    '[[run]]\nname = "ds"\ndynamic-sampling = true\n'
                    '[[run]]\nname = "curve"\neval-every = 2\n'
                    '[[run]]\nname = "lora"\nmethod = "lora"\n'
                    '[[run]]\nname = "tie"\nn-tie = ["all", 1]\nv-dtype = "bf16"\n')
    got = [[r.name for r in g] for g in groups(load_spec(spec))]
    # steps differ: another batch; dynamic sampling, a learning curve and LoRA train alone
    assert got == [["steps=5,seed=0,lr=0.01", "steps=5,seed=0,lr=0.03", "steps=5,seed=1,lr=0.01",
                    "steps=5,seed=1,lr=0.03", "tie,steps=5,n-tie=all,v-dtype=bf16", "tie,steps=5,n-tie=1,v-dtype=bf16"],
                   ["long,steps=9,seed=0", "long,steps=9,seed=1"], ["ds,steps=5,dynamic-sampling=True"],
                   ["curve,steps=5,eval-every=2"], ["lora,steps=5,method=lora"]]
