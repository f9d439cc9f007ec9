"""A killed evaluation resumes from its whole batches and gives the uninterrupted result."""

import json

import pytest
import torch

from tinylora import AdapterConfig, attach
from tinylora.evaluation.evaluate import evaluate
from tinylora.generation.engine import Engine
from tinylora.tasks import Problem
from tinylora.testing import tiny_model_and_tokenizer

PROBLEMS = [Problem(f"{i} + 1 ?", str(i + 1)) for i in range(6)]  # 3 batches of 2


@pytest.fixture
def model_and_adapter():
    torch.manual_seed(0)
    model, tok = tiny_model_and_tokenizer("llama")
    adapter = attach(model, AdapterConfig(n_tie=1))
    with torch.no_grad():
        adapter.v.normal_()
    return model, tok, adapter


def counting_generate(monkeypatch, kill_at: int | None = None) -> list:
    calls, generate = [], Engine.generate

    def counted(self, *args, **kwargs):
        calls.append(kwargs["seed"])
        if kill_at is not None and len(calls) == kill_at:
            raise KeyboardInterrupt  # what Ctrl-C or a sweep's kill does mid-evaluation
        return generate(self, *args, **kwargs)
    monkeypatch.setattr(Engine, "generate", counted)
    return calls


def run(model, tok, adapter, path, **kw):
    return evaluate(model, tok, PROBLEMS, adapter=adapter, max_new_tokens=4, batch_size=2, progress=False,
                    out_jsonl=path, **kw)


def test_a_killed_evaluation_resumes_after_its_whole_batches(model_and_adapter, tmp_path, monkeypatch):
    model, tok, adapter = model_and_adapter
    full = run(model, tok, adapter, tmp_path / "a.jsonl")
    counting_generate(monkeypatch, kill_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, adapter, tmp_path / "b.jsonl")
    partial = tmp_path / "b.jsonl.partial"
    assert not (tmp_path / "b.jsonl").exists() and len(partial.read_text().splitlines()) == 1 + 4
    with open(partial, "a") as f:
        f.write('{"index": 4, "prom')  # a row the kill cut short
    calls = counting_generate(monkeypatch)
    resumed = run(model, tok, adapter, tmp_path / "b.jsonl")
    assert calls == [4]  # only the last batch (seeded by its first problem) was generated again
    assert resumed == full
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    assert not partial.exists()
    assert [json.loads(x)["index"] for x in (tmp_path / "b.jsonl").read_text().splitlines()] == list(range(6))


@pytest.mark.parametrize("change", ["adapter", "settings", "base"])
def test_a_partial_evaluation_of_something_else_is_not_reused(model_and_adapter, tmp_path, monkeypatch, change):
    model, tok, adapter = model_and_adapter
    counting_generate(monkeypatch, kill_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, adapter, tmp_path / "b.jsonl")
    kw = {}
    if change == "adapter":
        with torch.no_grad():
            adapter.v.add_(1.0)  # a later training step's evaluation, into the same file
    elif change == "settings":
        kw["seed"] = 1
    else:
        adapter = None
    calls = counting_generate(monkeypatch)
    run(model, tok, adapter, tmp_path / "b.jsonl", **kw)
    assert len(calls) == 3
