import json

import pytest
from waiting import HANG_GUARD_S, line_count, running, wait_until

from tinylora.cli.main import main
from tinylora.generation import weights as cpu_weights
from tinylora.testing import tiny_model_and_tokenizer


@pytest.fixture
def model_dir(tmp_path):
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


@pytest.mark.slow
def test_train_end_to_end_on_a_tiny_model(model_dir, tmp_path, capsys):
    # the CPU paths (packed rollouts, merged vs packed generation), also on a machine with a GPU
    out, cpu = tmp_path / "run", ["--device", "cpu"]
    args = ["train", "--model", model_dir, "--steps", "3", "--batch-prompts", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--eval-n", "6", "--n", "20", "--n-tie", "all", "--u", "2", "--out", str(out),
            "--no-progress", *cpu]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "2 parameters" in text
    assert ("rollout weights: packed fp32" in text) == cpu_weights.packed_available()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == 2 and summary["steps"] == 3
    assert summary["adapter_bytes"] < 1024
    assert summary["base_eval"]["n_samples"] == 6 and len(summary["final_eval"]["ci95"]) == 2
    for name in ("adapter.safetensors", "checkpoint.safetensors", "metrics.jsonl", "reward.png",
                 "eval_base.jsonl", "eval_final.jsonl"):
        assert (out / name).is_file(), name
    row = json.loads((out / "eval_final.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"prompt", "completion", "extracted", "gold", "correct"}
    # resuming a finished run trains nothing more and keeps the adapter
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3

    assert main(["eval", "--model", model_dir, "--adapter", str(out / "adapter.safetensors"), "--n", "5",
                 "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_samples"] == 5 and 0 <= result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]
    assert main(["eval", "--model", model_dir, "--n", "5", "--max-new-tokens", "4"]) == 0
    assert "(strict, n=5)" in capsys.readouterr().out  # the same line as train's summary
    assert main(["eval", "--model", model_dir, "--n", "3", "--samples", "2", "--max-new-tokens", "4", "--json",
                 "--out", str(tmp_path / "e.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_samples"] == 6 and "pass_at_k" in result
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 0, 1, 1, 2, 2]  # k samples per problem, problem by problem
    assert rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"]

    # the exact generation paths agree: a packed copy + the adapter's hooks, and the adapter merged in
    completions = {}
    for weights in ("merged", "packed") if cpu_weights.packed_available() else ("merged",):
        assert main(["eval", "--model", model_dir, "--adapter", str(out / "adapter.safetensors"), "--n", "6",
                     "--max-new-tokens", "6", "--json", "--weights", weights, "--out", str(tmp_path / "w.jsonl"),
                     *cpu]) == 0
        lines = (tmp_path / "w.jsonl").read_text().splitlines()
        completions[weights] = [json.loads(line)["completion"] for line in lines]
    assert len(set(map(tuple, completions.values()))) == 1


def test_train_reports_bad_data_with_its_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1 + 1 ?", "answer": "2"}\n{"question": "x"}\n')
    assert main(["train", "--model", model_dir, "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_graphs_off_a_gpu_is_refused_by_name(model_dir, tmp_path, capsys):
    assert main(["train", "--model", model_dir, "--device", "cpu", "--graphs", "--out", str(tmp_path / "r")]) == 2
    assert "--graphs" in capsys.readouterr().err


def test_sft_from_the_command_line(model_dir, tmp_path):
    out = tmp_path / "sft"
    assert main(["train", "--model", model_dir, "--algo", "sft", "--method", "lora-xs", "--steps", "2",
                 "--batch-prompts", "2", "--eval-n", "0", "--n", "10", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["method"] == "lora-xs"


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    def cmd(out):
        return [sys.executable, "-m", "tinylora", "train", "--model", model_dir, "--steps", "40", "--batch-prompts",
                "2", "--group-size", "4", "--max-new-tokens", "6", "--eval-n", "0", "--n", "20", "--u", "2",
                "--n-tie", "all", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd(tmp_path / "cut"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    wait_until(lambda: line_count(metrics) >= 1, running(proc), "the first step's metrics line",
               lambda: proc.stdout.read() if proc.poll() is not None else "")
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    output = proc.communicate(timeout=HANG_GUARD_S)[0]
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["stopped_early"] and 0 < summary["steps"] < 40
    assert "--resume" in output
    subprocess.run(cmd(tmp_path / "cut") + ["--resume"], env=env, check=True, capture_output=True)
    subprocess.run(cmd(tmp_path / "full"), env=env, check=True, capture_output=True)
    resumed = load_file(str(tmp_path / "cut" / "adapter.safetensors"))["v"]
    full = load_file(str(tmp_path / "full" / "adapter.safetensors"))["v"]
    assert resumed.equal(full)
    assert len(metrics.read_text().splitlines()) == 40
    # the run's cost counts both sittings
    whole = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert whole["sittings"] == 2 and whole["wall_seconds"] > summary["wall_seconds"]
    assert whole["train_seconds"] > summary["train_seconds"]
