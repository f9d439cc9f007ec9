"""Fixed-shape decode steps (Engine(graphs=True), generation/graphs.py) on a CPU, where they run eagerly: what
they refuse, what a failed row leaves behind in the shared buffers, and a server's inference mode.
tests/test_against_generate.py checks their tokens against `model.generate`."""

import pytest
import test_against_generate as against_generate
import torch
from fixed_steps import DecodeSteps
from test_against_generate import (
    FULL_ATTENTION,
    PROMPTS,
    N,
    bank_and_references,
    greedy_schedule,
    hf_greedy,
    ids_of,
    rows_of,
    run_schedule,
    with_adapter,
)

from tinylora import AdapterConfig, attach
from tinylora.generation import graphs
from tinylora.generation.bank import AdapterBank
from tinylora.generation.engine import Engine, Sampling
from tinylora.testing import tiny_model_and_tokenizer

GREEDY = Sampling(max_new_tokens=8, temperature=0)


def test_what_a_fixed_step_cannot_run_is_refused_by_name():
    model, tok = tiny_model_and_tokenizer("llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="sdpa"):  # eager attention would add the boolean mask
        Engine(model, tok, graphs=True)
    model, tok = tiny_model_and_tokenizer("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        Engine(model, tok, graphs=True)
    model, tok = tiny_model_and_tokenizer("llama")
    attach(model, AdapterConfig(u=1, n_tie=4), progress=False)
    with pytest.raises(ValueError, match="another adapter's hooks"):  # attached, but not the engine's
        Engine(model, tok, graphs=True)
    model, tok = tiny_model_and_tokenizer("llama")
    lora = attach(model, AdapterConfig(method="lora", r=1), progress=False)
    with pytest.raises(ValueError, match="'lora' has none"):
        Engine(model, tok, adapter=lora, weights="hooks", graphs=True)
    Engine(model, tok, adapter=lora, weights="merged", graphs=True)  # merged: no hooks run


@pytest.mark.parametrize("weights", ["hooks", "merged"])
def test_one_adapter_runs_in_every_row_of_fixed_steps_and_follows_its_v(weights):
    """An engine's own adapter (a training run's rollouts): hooks run it per row from s·R (a merge leaves none
    to run), equal to `generate` with the adapter's hooks, and a changed v (an optimizer step) is followed."""
    model, tok, ad = with_adapter("qwen2", "alpha")
    ids = [ids_of(tok, p) for p in PROMPTS]
    refs = [hf_greedy(model, x, N) for x in ids]
    with torch.no_grad():
        ad.v.mul_(-1)
    flipped = [hf_greedy(model, x, N) for x in ids]
    assert flipped != refs
    with torch.no_grad():
        ad.v.mul_(-1)
    engine = Engine(model, tok, adapter=ad, weights=weights, graphs=True)
    steps = DecodeSteps(model)
    assert rows_of(engine.generate(PROMPTS, max_new_tokens=N, greedy=True)) == refs
    with torch.no_grad():
        ad.v.mul_(-1)
    assert rows_of(engine.generate(PROMPTS, max_new_tokens=N, greedy=True)) == flipped
    assert steps.fixed == 2 * (N - 1) and steps.ordinary == 0


@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_rows_join_and_leave_across_every_column_bucket(arch, monkeypatch):
    """Columns rounded up from 2 (not 128): the tiny prompts cross every bucket boundary."""
    monkeypatch.setattr(graphs, "MIN_COLUMNS", 2)
    against_generate.test_rows_joining_and_leaving_a_running_batch_equal_generate(arch, 2, True, None, monkeypatch)


def test_a_failed_rows_keys_and_values_never_reach_a_later_row(monkeypatch):
    """A row whose adapter gives NaN leaves its keys and values in its slot of the shared buffers: a 7-token
    prompt. After it fails, the batch is trimmed to 2 columns and a 1-token row joins that slot; the columns it
    does not write are masked, and a masked NaN would still make its output NaN. Then a `generate()` that raises
    on such a row, and a healthy one after it on the same engine."""
    model, tok, bank, alone = bank_and_references("llama")
    short, long = ids_of(tok, PROMPTS[3]), ids_of(tok, PROMPTS[2])
    ref = hf_greedy(alone[None], short, GREEDY.max_new_tokens)
    broken = torch.full_like(bank.zeros(), float("nan"))
    engine = Engine(model, tok, bank=bank, graphs=True, max_batch=4)
    steps = DecodeSteps(model)
    rows = run_schedule(engine, {0: [(short, GREEDY, None), (long, GREEDY, broken)], 1: [(short, GREEDY, None)]})
    assert rows[1].finish_reason == "error" and rows[1].tokens == []
    assert rows[0].tokens == ref and rows[2].tokens == ref and steps.fixed > 0 and steps.ordinary == 0
    with monkeypatch.context() as patched:
        patched.setattr(bank, "stack", lambda names: [broken for _ in names])
        with pytest.raises(FloatingPointError):
            engine.generate([PROMPTS[2], PROMPTS[3]], max_new_tokens=8, greedy=True, adapters=["x", "y"])
    healthy = engine.generate([PROMPTS[3]], max_new_tokens=8, greedy=True, adapters=[None])
    assert healthy.completion_ids[0, :len(ref)].tolist() == ref


def test_a_server_engine_allocates_its_buffers_outside_inference_mode(tmp_path):
    """The server steps under torch.inference_mode(); the fixed buffers outlive those steps, and a later
    `generate()` (outside it) writes into them."""
    model, tok = tiny_model_and_tokenizer("llama")
    bank = AdapterBank(model, config=AdapterConfig(u=1, n_tie=4), progress=False)
    bank.add("a", bank.config, torch.full((len(bank.adapter.groups), 1), 0.5))
    engine = Engine(model, tok, bank=bank, graphs=True)
    with torch.inference_mode():
        served = run_schedule(engine, {0: [(ids_of(tok, PROMPTS[0]), GREEDY, bank.get("a"))]})
    again = engine.generate([PROMPTS[0]], max_new_tokens=8, greedy=True, adapters=["a"])
    assert again.completion_ids[0, :len(served[0].tokens)].tolist() == served[0].tokens


@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_buffers_grown_while_a_batch_runs_keep_its_keys_and_values(arch, monkeypatch):
    """Buffers sized for a first short row (column buckets from 2), then rows join that need more columns, one with
    a longer prompt that shifts the batch right: the buffers are replaced mid-batch, the running rows' keys and
    values carried over, and every row still equals `model.generate` with its adapter."""
    monkeypatch.setattr(graphs, "MIN_COLUMNS", 2)
    model, tok, bank, alone = bank_and_references(arch)
    ids = [ids_of(tok, p) for p in PROMPTS]
    plan = [(0, 3, "alpha", 2), (0, 1, None, 3), (1, 0, "beta", 12), (3, 2, "gamma", 12), (5, 5, None, 12)]
    refs = [hf_greedy(alone[w], ids[k], n) for _, k, w, n in plan]
    engine = Engine(model, tok, bank=bank, max_batch=3, prefill_chunk=2, graphs=True)
    columns = []  # the buffers' columns at each fixed step, with whether rows were running from before
    decode = engine.fixed.decode

    def recorded(*args, **kwargs):
        columns.append(engine.fixed.cols)
        return decode(*args, **kwargs)
    monkeypatch.setattr(engine.fixed, "decode", recorded)
    steps = DecodeSteps(model)
    rows = run_schedule(engine, greedy_schedule(plan, ids, bank))
    assert [r.tokens for r in rows] == refs
    assert len(set(columns)) > 1 and columns == sorted(columns)  # grown while the batch ran
    assert steps.ordinary == 0


def test_warm_up_runs_every_row_bucket_with_and_without_adapters_and_leaves_nothing_behind():
    """A server's start records each decode shape's CUDA graph ahead (Engine.warm_up); on a CPU the same fixed
    steps run eagerly, so which shapes ran is visible here. After it the engine serves as if fresh."""
    model, tok, bank, alone = bank_and_references("llama")
    engine = Engine(model, tok, bank=bank, graphs=True, max_batch=8)
    seen = []
    forward = engine.fixed.forward
    engine.fixed.forward = lambda cache, *key: (seen.append(key), forward(cache, *key))[1]
    assert engine.warm_up() == 2 * (8 + 1)
    assert set(seen) == {(rows, graphs.MIN_COLUMNS, adapted) for rows in (1, 2, 4, 8) for adapted in (False, True)}
    assert engine.idle and engine.running == []
    ids = [ids_of(tok, p) for p in PROMPTS[:3]]
    which = ["beta", None, "gamma"]
    refs = [hf_greedy(alone[w], x, N) for w, x in zip(which, ids)]
    rows = run_schedule(engine, greedy_schedule([(0, k, w, N) for k, w in enumerate(which)], ids, bank))
    assert [r.tokens for r in rows] == refs
    assert Engine(model, tok, bank=bank).warm_up() == 0  # no fixed-shape steps: nothing to record
