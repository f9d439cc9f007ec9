"""experiments/random_direction.py: the control evaluates a finished run's adapter with random directions of its
norm on the run's own held-out problems, pairs it with the trained v, and appends one CSV row per seed once."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_sweep import model_dir  # noqa: F401  (a fixture)
from transformers import AutoModelForCausalLM

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.api import DataConfig, ModelConfig, evaluate

_spec = importlib.util.spec_from_file_location(
    "random_direction", Path(__file__).resolve().parent.parent / "experiments" / "random_direction.py")
random_direction = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(random_direction)


def test_each_seed_is_evaluated_once_and_paired_with_the_trained_v(model_dir, tmp_path):  # noqa: F811
    docs = tmp_path / "docs"
    run = docs / "trained" / "s" / "r"
    run.mkdir(parents=True)
    ad = attach(AutoModelForCausalLM.from_pretrained(model_dir), AdapterConfig(u=1, n_tie="all"), progress=False)
    with torch.no_grad():
        ad.v.fill_(0.3)
    save_adapter(ad, run / "adapter.safetensors")
    (docs / "s.csv").write_text("name,status,model,levels,eval-n,max-new-tokens\n"
                                f'r,done,{model_dir},"1,2",6,3\n')
    # the trained run's evaluation, its scores set by hand: right on problems 0, 2 and 4
    evaluate(ModelConfig(model=model_dir, device="cpu"), DataConfig(levels="1,2", eval_n=6), adapter=None,
             n=6, max_new_tokens=3, out=str(tmp_path / "base.jsonl"), progress=False)
    trained = [json.loads(x) for x in (tmp_path / "base.jsonl").read_text().splitlines()]
    for r in trained:
        r["correct"] = r["lenient_correct"] = r["index"] % 2 == 0
    (run / "eval_final.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trained))

    rows = random_direction.run_controls([run], [0, 1], docs)
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        control = [json.loads(x) for x in (run / f"eval_random_direction_{r['seed']}.jsonl").read_text().splitlines()]
        assert [c["prompt"] for c in control] == [t["prompt"] for t in trained]  # the run's own problems
        lost = sum(t["correct"] and not c["correct"] for t, c in zip(trained, control))
        gained = sum(c["correct"] and not t["correct"] for t, c in zip(trained, control))
        assert (r["gained"], r["lost"]) == (gained, lost) and r["trained_acc"] == 0.5
        assert float(r["v_norm"]) == pytest.approx(0.3, rel=1e-6) and r["acc"] == sum(c["correct"] for c in control) / 6
    assert not list(run.glob("*.partial"))
    assert [r["seed"] for r in random_direction.run_controls([run], [0, 1, 2], docs)] == [2]  # the others: done
    with open(docs / "trained" / "random_direction.csv", newline="") as f:
        assert [int(r["seed"]) for r in csv.DictReader(f)] == [0, 1, 2]
