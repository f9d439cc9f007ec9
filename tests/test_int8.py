import pytest
import torch

from tinylora import AdapterConfig, attach, int8
from tinylora.rollout import sample, sequence_logprobs
from tinylora.testing import tiny_model_and_tokenizer

pytestmark = pytest.mark.skipif(not int8.available(), reason="fbgemm int8 kernels exist on x86 CPUs only")
PROMPTS = ["t20 t21 t22", "t30 ?", "t40 t41 t42 t43 t44", "t50"]


def logits(model, tok):
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits[enc.attention_mask.bool()]  # [tokens, V]


def test_int8_weights_approximate_fp32_and_restore_it(arch):
    model, tok = tiny_model_and_tokenizer(arch, initializer_range=0.1)
    exact = logits(model, tok)
    weights = int8.Int8Weights(model)
    assert len(weights.packed) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with weights.active():
        approx = logits(model, tok)
    rel = (approx - exact).norm() / exact.norm()
    assert 0 < rel < 0.1, rel  # int8 rounding: close, not equal
    assert torch.equal(logits(model, tok), exact)  # fp32 forward is back, bit for bit


def test_adapter_hooks_fire_on_int8_weights():
    model, tok = tiny_model_and_tokenizer("qwen2", initializer_range=0.1)
    adapter = attach(model, AdapterConfig(u=2, n_tie=4))
    weights = int8.Int8Weights(model)
    with weights.active():
        base = logits(model, tok)
    with torch.no_grad():
        adapter.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    with weights.active():
        adapted = logits(model, tok)
    exact_delta = logits(model, tok) - exact_base(model, tok, adapter)
    # the int8 path moves the logits by the same adapter contribution as fp32 does
    torch.testing.assert_close(adapted - base, exact_delta, atol=0.05 * exact_delta.abs().max().item(), rtol=0)
    assert exact_delta.abs().max() > 1e-3


def exact_base(model, tok, adapter):
    with adapter.disabled():
        return logits(model, tok)


def test_int8_rollouts_are_seeded_and_close_to_the_fp32_policy():
    model, tok = tiny_model_and_tokenizer("llama", initializer_range=0.1)
    weights = int8.Int8Weights(model)
    with weights.active():
        a = sample(model, tok, PROMPTS * 2, max_new_tokens=8, temperature=1.0, seed=3)
        b = sample(model, tok, PROMPTS * 2, max_new_tokens=8, temperature=1.0, seed=3)
    assert torch.equal(a.input_ids, b.input_ids)
    train = sequence_logprobs(model, a.input_ids, a.attention_mask, a.prompt_len)
    gap = ((train - a.logp_rollout).abs() * a.completion_mask).sum() / a.completion_mask.sum()
    assert 0 < gap < 0.1, gap
