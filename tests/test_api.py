"""The typed Python API and the features beyond the demo: your own data and reward, devices, tracking."""

import json
import math
from dataclasses import replace

import pytest
import torch

from tinylora import AdapterConfig
from tinylora.api import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, train
from tinylora.cli.main import main
from tinylora.testing import tiny_model_and_tokenizer

WORDS = [f"t{20 + i}" for i in range(12)]


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """A tiny model with peaked logits (init 0.3, like a trained model) and the 8 first words whose probability
    rises most when its one shared v is set to 0.5: a reward for starting with one of them can be learned
    by construction (measured: their share of first words goes from ~0.11 at v = 0 to ~0.30 at v = 0.5)."""
    path = tmp_path_factory.mktemp("model") / "m"
    # llama: a saved qwen2 folder makes AutoTokenizer pick Qwen2's tokenizer class over the tiny word-level one
    model, tok = tiny_model_and_tokenizer("llama", initializer_range=0.3)
    from tinylora import attach
    from tinylora.tasks.prompts import chat_prompts
    adapter = attach(model, AdapterConfig(u=1, n_tie="all"))
    tok.padding_side = "left"
    prompts = chat_prompts(tok, [f"{w} ?" for w in WORDS], "", None)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        base = torch.softmax(model(**enc).logits[:, -1], -1).mean(0)  # [V]
        adapter.v.fill_(0.5)
        moved = torch.softmax(model(**enc).logits[:, -1], -1).mean(0)  # [V]
        adapter.v.zero_()
    rise = moved - base
    rise[: len(tok.all_special_ids) + 1] = -1.0
    good = tok.convert_ids_to_tokens(rise.topk(8).indices.tolist())
    model = adapter.detach()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), good


def write_task(tmp_path, good):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"word": w, "lang": "toy", "solution": f"{good[0]} {w}"}) + "\n"
                            for w in WORDS))  # the solution: what SFT learns
    reward = tmp_path / "my_reward.py"
    reward.write_text(f"GOOD = set({good!r})\n\n"
                      "def planted(completions, word, lang, **kwargs):\n"
                      "    assert len(word) == len(completions) and set(lang) == {'toy'}  # the data's columns\n"
                      "    return [float(bool(c.split()) and c.split()[0] in GOOD) for c in completions]\n")
    return data, reward


@pytest.mark.slow
def test_python_api_trains_a_non_math_task_with_a_custom_reward_and_the_reward_rises(peaked_model, tmp_path):
    model_dir, good = peaked_model
    data_file, reward_file = write_task(tmp_path, good)
    model = ModelConfig(model=model_dir, device="cpu")
    data = DataConfig(data=str(data_file), prompt_template="{word} ?", eval_n=0)
    reward = f"{reward_file}:planted"
    # the settings of the GRPO test in test_train.py: one number, 192 samples a step
    cfg = TrainConfig(steps=16, lr=0.1, batch_prompts=12, group_size=16, micro_batch=64, max_new_tokens=8,
                      temperature=1.0, warmup=0.0, reward=reward, system="")
    summary = train(model, data, AdapterConfig(u=1, n_tie="all"), cfg, RunConfig(out=str(tmp_path / "run"),
                                                                                   progress=False))
    assert summary["trainable_params"] == 1 and summary["steps"] == 16
    scored = dict(data=data, n=12, samples=32, max_new_tokens=8, reward=reward, suffix="", system=None,
                  progress=False, seed=7)
    before = evaluate(model, **scored)
    after = evaluate(model, adapter=str(tmp_path / "run" / "adapter.safetensors"), **scored)
    assert "lenient_accuracy" not in before  # no numeric answers: no lenient score
    assert after["accuracy"] > before["accuracy"] + 0.05, (before["accuracy"], after["accuracy"])


def test_the_same_run_from_the_command_line(peaked_model, tmp_path, capsys):
    model_dir, good = peaked_model
    data_file, reward_file = write_task(tmp_path, good)
    out = tmp_path / "cli"
    assert main(["train", "--model", model_dir, "--device", "cpu", "--data", str(data_file), "--prompt-template",
                 "{word} ?", "--reward", f"{reward_file}:planted", "--eval-n", "4", "--steps", "2",
                 "--batch-prompts", "2", "--group-size", "4", "--max-new-tokens", "4", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval"]["n_problems"] == 4  # the last 4 rows, held out
    rows = [json.loads(line) for line in (out / "eval_final.jsonl").read_text().splitlines()]
    assert [r["prompt"].split()[1] for r in rows] == WORDS[-4:]  # "Question: t28 ?"
    # every row scored by the user's reward file: 1 when the completion's first word is one of the planted words
    firsts = [(r["completion"].split() or [None])[0] for r in rows]
    assert [r["reward"] for r in rows] == [float(w in good) for w in firsts], (firsts, good)
    assert summary["final_eval"]["accuracy"] == pytest.approx(sum(r["reward"] for r in rows) / 4)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr"),
    (["--device", "tpu"], "--device"),
    (["--reward", "nope"], "--reward"),
    (["--reward", "missing.py:fn"], "reward file not found"),
    (["--levels", "1,9"], "--levels"),
    (["--report-to", "mlflow"], "--report-to"),
    (["--mini-batches", "0"], "--mini-batches"),
    (["--prompt-template", "{word"], "prompt template"),
])
def test_invalid_options_fail_in_one_line_naming_the_option(flags, message, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_reward_that_returns_garbage_is_reported(tmp_path, monkeypatch):
    from tinylora.tasks.rewards import load_reward, score
    bad = tmp_path / "bad.py"
    bad.write_text("def short(completions, **kw):\n    return [1.0]\n\ndef nan(completions, **kw):\n"
                   "    return [float('nan')] * len(completions)\n")
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        score(load_reward(f"{bad}:short"), ["a", "b"], ["p", "p"], [{}, {}])
    with pytest.raises(ValueError, match="finite floats or None"):
        score(load_reward(f"{bad}:nan"), ["a"], ["p"], [{}])
    with pytest.raises(ValueError, match="has no function 'other'"):
        load_reward(f"{bad}:other")
    # module:function gives that very function, from the library or from any importable module
    from tinylora.tasks.rewards import lenient_reward
    assert load_reward("tinylora.tasks.rewards:lenient_reward") is lenient_reward
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "tl_test_rewards_mod.py").write_text(
        "def length(completions, lang, **kw):\n    return [len(c) + (lang_ == 'x') / 2 for c, lang_ in "
        "zip(completions, lang)]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    assert score(load_reward("tl_test_rewards_mod:length"), ["ab", "abcd"], ["p", "p"],
                 [{"lang": "x"}, {"lang": "y"}]) == [2.5, 4.0]


def test_devices_and_dtypes_resolve_to_what_this_machine_has():
    from tinylora.models import resolve_device, resolve_dtype
    assert resolve_device("cpu") == "cpu"
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    assert resolve_dtype("auto", "cpu") == "fp32"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_generation_in_bf16_keeps_the_adapter_as_hooks():
    from tinylora import attach
    from tinylora.generation import weights as cpu_weights
    model, _ = tiny_model_and_tokenizer("llama")
    attach(model, AdapterConfig())
    assert cpu_weights.for_generation(model.to(torch.bfloat16), "auto") .__class__ is cpu_weights.AdapterHooks
    with pytest.raises(ValueError, match="CPU models|fp32"):
        cpu_weights.for_generation(model, "packed")


def test_tensorboard_gets_the_metrics(peaked_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model_dir, _ = peaked_model
    out = tmp_path / "tb"
    assert main(["train", "--model", model_dir, "--steps", "2", "--batch-prompts", "2", "--max-new-tokens", "4",
                 "--eval-n", "2", "--n", "8", "--out", str(out), "--no-progress", "--report-to", "tensorboard"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/reward_mean", "train/loss", "eval_base/accuracy", "eval_final/lenient_accuracy"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where the device tool lends one)")
def test_gpu_smoke_grpo_steps_with_rollout_and_train_log_probs_agreeing(tmp_path):
    from tinylora import attach
    from tinylora.tasks import Problem
    from tinylora.tasks.rewards import pairwise
    from tinylora.training.trainer import Trainer
    model, tok = tiny_model_and_tokenizer("qwen2", initializer_range=0.3)
    model = model.to("cuda", torch.bfloat16)
    adapter = attach(model, AdapterConfig(u=2, n_tie="all"))
    problems = [Problem(f"{w} ?", "0") for w in WORDS]
    cfg = TrainConfig(steps=3, batch_prompts=4, group_size=4, max_new_tokens=8, lr=0.05, warmup=0.0, suffix="",
                      system="")
    trainer = Trainer(model, tok, adapter, problems, cfg, tmp_path, progress=False)
    assert str(trainer.engine.weights).startswith("the model's own weights")
    trainer.reward = pairwise(lambda c, g: float(len(c.split()) % 2))
    history = trainer.fit()
    assert adapter.v.device.type == "cuda" and torch.isfinite(adapter.v).all()
    assert any(m["grad_norm"] > 0 for m in history)
    assert all(m["logp_gap"] < 0.05 for m in history), [m["logp_gap"] for m in history]  # same weights, same math


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "sft"])
def test_eval_every_adds_a_learning_curve_and_leaves_training_untouched(peaked_model, tmp_path, algo):
    model_dir, good = peaked_model
    data_file, reward_file = write_task(tmp_path, good)
    model = ModelConfig(model=model_dir, device="cpu")
    data = DataConfig(data=str(data_file), prompt_template="{word} ?", eval_n=4)
    # both evaluate with the adapter merged into the fp32 weights and taken out again between steps
    cfg = TrainConfig(algo=algo, steps=4, lr=0.1, batch_prompts=4, group_size=4, max_new_tokens=4,
                      temperature=1.0, warmup=0.0, reward=f"{reward_file}:planted", system="",
                      rollout_weights="merged")
    summaries = {every: train(model, data, AdapterConfig(u=1, n_tie="all"), cfg,
                              RunConfig(out=str(tmp_path / str(every)), progress=False, eval_every=every))
                 for every in (0, 1)}
    metrics = {every: [json.loads(x) for x in (tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()]
               for every in (0, 1)}
    # the evaluations in between (merging the adapter into the weights and out again) change nothing in training
    assert [m["v"] for m in metrics[0]] == [m["v"] for m in metrics[1]]
    assert summaries[0]["final_eval"]["accuracy"] == summaries[1]["final_eval"]["accuracy"]
    assert summaries[0]["evals_during"] == []
    curve = summaries[1]["evals_during"]
    assert [e["step"] for e in curve] == [1, 2, 3]  # step 4 is the final evaluation
    assert [m.get("eval") for m in metrics[1]] == [*curve, None]
    assert all(0 <= e["accuracy"] <= 1 for e in curve)
    assert (tmp_path / "1" / "eval_step2.jsonl").is_file()



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where the device tool lends one)")
def test_gpu_train_with_eval_every_then_resume(peaked_model, tmp_path):
    model_dir, good = peaked_model
    data_file, reward_file = write_task(tmp_path, good)
    model = ModelConfig(model=model_dir, device="cuda")  # bf16, the adapter as hooks
    data = DataConfig(data=str(data_file), prompt_template="{word} ?", eval_n=4)
    cfg = TrainConfig(steps=4, lr=0.1, batch_prompts=4, group_size=4, max_new_tokens=4, temperature=1.0,
                      warmup=0.0, reward=f"{reward_file}:planted", system="")
    whole = train(model, data, AdapterConfig(u=1, n_tie="all"), cfg,
                  RunConfig(out=str(tmp_path / "whole"), progress=False, eval_every=1))
    assert [e["step"] for e in whole["evals_during"]] == [1, 2, 3] and whole["final_eval"] is not None
    # two steps, then resumed to four: the curve and the metrics continue where they stopped
    train(model, data, AdapterConfig(u=1, n_tie="all"), replace(cfg, steps=2),
          RunConfig(out=str(tmp_path / "split"), progress=False, eval_every=1))
    resumed = train(model, data, AdapterConfig(u=1, n_tie="all"), cfg,
                    RunConfig(out=str(tmp_path / "split"), progress=False, eval_every=1, resume=True))
    assert [e["step"] for e in resumed["evals_during"]] == [1, 2, 3]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    v = [json.loads(x)["v"] for x in lines]
    assert all(math.isfinite(x) for row in v for x in (row if isinstance(row, list) else [row]))

def test_eval_every_must_be_a_count():
    with pytest.raises(ValueError, match="eval_every"):
        RunConfig(eval_every=-1)


def test_random_direction_control_keeps_the_norm_and_draws_a_seeded_direction(peaked_model, tmp_path, capsys):
    from tinylora import attach, save_adapter
    from tinylora.api import _randomize_direction
    from tinylora.testing import tiny_model
    adapter = attach(tiny_model("qwen2"), AdapterConfig(u=2, n_tie=3))
    with torch.no_grad():
        adapter.v.copy_(torch.arange(adapter.v.numel(), dtype=torch.float32).view_as(adapter.v) / 10)
    trained = adapter.v.detach().clone()
    _randomize_direction(adapter, 5)
    d = torch.randn(trained.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # by hand
    expected = d / d.norm() * trained.double().norm()
    assert torch.allclose(adapter.v.double(), expected, atol=1e-6)
    assert abs(float(torch.nn.functional.cosine_similarity(adapter.v.detach().flatten(), trained.flatten(), 0))) < 0.99
    model_dir, _ = peaked_model  # through evaluate: the result names the control and the norm it kept
    one = attach(__import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir), AdapterConfig(n_tie="all"))
    with torch.no_grad():
        one.v.fill_(-0.7)
    path = save_adapter(one, tmp_path / "a.safetensors")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{w} ?", "answer": "1"}) + "\n" for w in WORDS))
    r = evaluate(ModelConfig(model=model_dir, device="cpu"), DataConfig(data=str(data), eval_n=0), adapter=str(path),
                 n=4, max_new_tokens=2, progress=False, random_direction=2, suffix="", system=None)
    assert r["random_direction"] == 2 and r["v_norm"] == pytest.approx(0.7, rel=1e-6)
    assert main(["eval", "--model", model_dir, "--data", str(data), "--random-direction", "1"]) == 2
    assert "random_direction=1 is invalid" in capsys.readouterr().err
