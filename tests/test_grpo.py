import math

import pytest
import torch

from tinylora.training.grpo import group_advantages, kl_k3, policy_loss, truncated_is_weight, zero_std_fraction


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])
    a = group_advantages(r, 4)
    # group 1: mean 0.25, unbiased std 0.5; group 2: mean 0.5, std sqrt(1/3); group 3: constant -> 0
    s2 = math.sqrt(1 / 3)
    expected = [1.5, -0.5, -0.5, -0.5, 0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2, 0, 0, 0, 0]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-5)
    dr = group_advantages(r, 4, scale_by_std=False)  # Dr. GRPO: centred only
    assert torch.allclose(dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0]))
    assert zero_std_fraction(r, 4) == pytest.approx(1 / 3)


def _loss(ratios, adv, mask=None, **kw):
    logp_old = torch.log(torch.tensor([[0.3, 0.2, 0.25]]))
    logp = (logp_old + torch.log(torch.tensor([ratios]))).requires_grad_()
    mask = torch.ones_like(logp) if mask is None else torch.tensor([mask])
    loss, stats = policy_loss(logp, logp_old, torch.tensor([adv]), mask, eps_low=0.2, eps_high=0.4, **kw)
    return loss, logp, stats


def test_clipped_loss_by_hand():
    # A = +1: per token max(-r, -clip(r)) = [-0.5, -1, -1.4] (0.5 is below 1-0.2 but the min keeps -0.5)
    loss, _, stats = _loss([0.5, 1.0, 1.5], 1.0)
    assert loss.item() == pytest.approx((-0.5 - 1.0 - 1.4) / 3)
    assert stats["clip_frac"] == pytest.approx(1 / 3)  # the clip binds at 1.5 only (0.5 keeps its gradient)
    # A = -1: per token max(r, clip(r)) = [0.8, 1, 1.5]
    loss, _, stats = _loss([0.5, 1.0, 1.5], -1.0)
    assert loss.item() == pytest.approx((0.8 + 1.0 + 1.5) / 3)
    assert stats["clip_frac"] == pytest.approx(1 / 3)  # here it binds at 0.5


def test_clipped_tokens_get_no_gradient():
    loss, logp, _ = _loss([0.5, 1.0, 1.5], 1.0)
    loss.backward()
    g = logp.grad[0]
    assert g[2] == 0  # r = 1.5 > 1.4 with A > 0: clipped, no push further
    assert g[1] == pytest.approx(-1 / 3)  # d(-r)/dlogp = -r, token mean over 3
    assert g[0] == pytest.approx(-0.5 / 3)  # r below 1 - eps with A > 0 is not clipped (pessimistic bound)


def test_token_mean_ignores_padding_and_uses_the_given_denominator():
    loss, _, _ = _loss([1.0, 1.0, 1.0], 2.0, mask=[1, 1, 0])
    assert loss.item() == pytest.approx(-2.0)
    loss, _, _ = _loss([1.0, 1.0, 1.0], 2.0, mask=[1, 1, 0], n_tokens=4)
    assert loss.item() == pytest.approx(-4.0 / 4)


def test_truncated_importance_weights_are_capped_and_detached():
    logp_train = torch.log(torch.tensor([[0.5, 0.1, 0.9]])).requires_grad_()
    logp_roll = torch.log(torch.tensor([[0.5, 0.4, 0.3]]))
    w = truncated_is_weight(logp_train, logp_roll, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 0.25, 2.0]]))
    assert not w.requires_grad
    loss, _, _ = _loss([1.0, 1.0, 1.0], 1.0, is_weight=torch.tensor([[1.0, 0.25, 2.0]]))
    assert loss.item() == pytest.approx(-(1 + 0.25 + 2) / 3)


def test_kl_is_zero_at_equal_policies_and_positive_otherwise():
    a = torch.log(torch.tensor([[0.2, 0.5]]))
    assert torch.equal(kl_k3(a, a), torch.zeros_like(a))
    assert (kl_k3(a, a + 0.3) > 0).all() and (kl_k3(a, a - 0.3) > 0).all()


def test_kl_term_is_zero_at_v_zero_on_a_real_model():
    from tinylora import AdapterConfig, attach
    from tinylora.testing import tiny_model
    from tinylora.training.logprobs import sequence_logprobs
    model = tiny_model("qwen2")
    adapter = attach(model, AdapterConfig(u=2, n_tie=4))
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    logp = sequence_logprobs(model, ids, mask, 4)
    with adapter.disabled():
        ref = sequence_logprobs(model, ids, mask, 4)
    assert torch.equal(kl_k3(logp, ref), torch.zeros_like(logp))
    with torch.no_grad():
        adapter.v.fill_(0.5)
    assert kl_k3(sequence_logprobs(model, ids, mask, 4), ref).mean() > 0
