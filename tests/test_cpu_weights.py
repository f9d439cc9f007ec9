import pytest
import torch

from tinylora import AdapterConfig, attach
from tinylora.generation import weights as cpu_weights
from tinylora.generation.engine import sample
from tinylora.testing import tiny_model, tiny_model_and_tokenizer
from tinylora.training.logprobs import sequence_logprobs

needs_int8 = pytest.mark.skipif(not cpu_weights.int8_available(), reason="fbgemm int8 kernels exist on x86 CPUs only")
needs_packed = pytest.mark.skipif(not cpu_weights.packed_available(), reason="this PyTorch build has no oneDNN")
KINDS = [pytest.param(cpu_weights.PackedWeights, marks=needs_packed, id="packed"),
         pytest.param(cpu_weights.Int8Weights, marks=needs_int8, id="int8")]
TOLERANCE = {cpu_weights.PackedWeights: (0, 1e-5), cpu_weights.Int8Weights: (1e-4, 0.1)}  # relative error range
PROMPTS = ["t20 t21 t22", "t30 ?", "t40 t41 t42 t43 t44", "t50"]


def logits(model, tok):
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits[enc.attention_mask.bool()]  # [tokens, V]


@pytest.mark.parametrize("kind", KINDS)
def test_copies_approximate_fp32_and_restore_it(arch, kind):
    model, tok = tiny_model_and_tokenizer(arch, initializer_range=0.1)
    exact = logits(model, tok)
    weights = kind(model)
    assert len(weights.copies) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with weights.active():
        approx = logits(model, tok)
    rel = ((approx - exact).norm() / exact.norm()).item()
    lo, hi = TOLERANCE[kind]
    assert lo <= rel < hi, rel  # packed: fp32 up to summation order; int8: rounding, close but not equal
    assert torch.equal(logits(model, tok), exact)  # the plain forward is back, bit for bit


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_hooks_fire_on_copies(kind):
    model, tok = tiny_model_and_tokenizer("qwen2", initializer_range=0.1)
    adapter = attach(model, AdapterConfig(u=2, n_tie=4))
    weights = kind(model)
    with weights.active():
        base = logits(model, tok)
    with torch.no_grad():
        adapter.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    with weights.active():
        adapted = logits(model, tok)
    with adapter.disabled():
        exact_base = logits(model, tok)
    exact_delta = logits(model, tok) - exact_base
    # the copy moves the logits by the same adapter contribution as the fp32 model does
    atol = 0.05 if kind is cpu_weights.Int8Weights else 1e-4
    torch.testing.assert_close(adapted - base, exact_delta, atol=atol * exact_delta.abs().max().item(), rtol=0)
    assert exact_delta.abs().max() > 1e-3


@needs_packed
def test_with_autograd_on_the_plain_forward_runs_and_gradients_are_exact():
    model, tok = tiny_model_and_tokenizer("qwen2", initializer_range=0.1)
    adapter = attach(model, AdapterConfig(u=2, n_tie=4))
    weights = cpu_weights.PackedWeights(model)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)

    def grad():
        adapter.v.grad = None
        model(**enc).logits.square().mean().backward()
        return adapter.v.grad.clone()

    plain = grad()
    with weights.active():
        assert torch.equal(grad(), plain)  # the packed op has no backward: it must not be used here


@pytest.mark.parametrize("kind", KINDS)
def test_rollouts_are_seeded_and_close_to_the_fp32_policy(kind):
    model, tok = tiny_model_and_tokenizer("llama", initializer_range=0.1)
    weights = kind(model)
    with weights.active():
        a = sample(model, tok, PROMPTS * 2, max_new_tokens=8, temperature=1.0, seed=3)
        b = sample(model, tok, PROMPTS * 2, max_new_tokens=8, temperature=1.0, seed=3)
    assert torch.equal(a.input_ids, b.input_ids)
    train = sequence_logprobs(model, a.input_ids, a.attention_mask, a.prompt_len)
    gap = ((train - a.logp_rollout).abs() * a.completion_mask).sum() / a.completion_mask.sum()
    if kind is cpu_weights.PackedWeights:
        assert gap < 1e-5, gap
        exact = sample(model, tok, PROMPTS * 2, max_new_tokens=8, temperature=1.0, seed=3)
        assert torch.equal(a.input_ids, exact.input_ids)  # the same draws as the plain fp32 model
    else:
        assert 0 < gap < 0.1, gap


def test_for_generation_picks_packed_on_fp32_cpu_and_refuses_what_it_cannot_do():
    model = tiny_model("llama")
    auto = cpu_weights.for_generation(model)
    assert type(auto) is (cpu_weights.PackedWeights if cpu_weights.packed_available() else cpu_weights.Merged)
    assert type(cpu_weights.for_generation(model, "merged")) is cpu_weights.Merged
    assert type(cpu_weights.for_generation(model, "auto", trains_base=True)) is cpu_weights.Merged
    with pytest.raises(ValueError, match="full fine-tuning"):
        cpu_weights.for_generation(model, "packed", trains_base=True)
    with pytest.raises(ValueError, match="expected one of"):
        cpu_weights.for_generation(model, "fp16")
    half = tiny_model("llama", dtype=torch.bfloat16)
    # auto: packed is fp32-only, and merging a small ΔW into bf16 weights would round it away: hooks
    assert isinstance(cpu_weights.for_generation(half), cpu_weights.AdapterHooks)
    if cpu_weights.packed_available():
        with pytest.raises(ValueError, match="fp32"):
            cpu_weights.for_generation(half, "packed")


@needs_packed
def test_auto_falls_back_to_merged_when_the_copy_would_not_fit(monkeypatch):
    model = tiny_model("llama")
    assert cpu_weights.linear_bytes(model) == 4 * sum(m.weight.numel() for m in model.modules()
                                                      if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(cpu_weights, "available_memory", lambda: 2 * cpu_weights.linear_bytes(model))
    assert isinstance(cpu_weights.for_generation(model), cpu_weights.PackedWeights)
    monkeypatch.setattr(cpu_weights, "available_memory", lambda: 2 * cpu_weights.linear_bytes(model) - 1)
    assert type(cpu_weights.for_generation(model)) is cpu_weights.Merged
    assert isinstance(cpu_weights.for_generation(model, "packed"), cpu_weights.PackedWeights)  # asked: obeyed
