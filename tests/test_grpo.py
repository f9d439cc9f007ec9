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


# ---- one GRPO step of the trainer against an independent implementation --------------------------------
# The trainer's step (group_advantages → group_logprobs → truncated_is_weight → policy_loss, micro-batched)
# is compared with the GRPO math written out below, sequence by sequence, in float64: no padding, no KV cache,
# no shared prompt pass, none of the library's loss functions.

G = 4
PAD, EOS = 1, 2  # tiny_tokenizer's ids
# three prompts of different lengths (the batch left-pads them) and G completions each, of different lengths,
# some ending in EOS and some cut at the length limit (the batch right-pads them)
STEP_PROMPTS = [[20, 21, 22, 23, 24], [30, 31, 32], [40, 41, 42, 43]]
STEP_COMPLETIONS = [[50, 51, 52, 53, 54, 55], [60, 61, EOS], [70, 71, 72, 73, 74], [80, EOS],
                    [90, 91, 92, EOS], [100, 101, 102, 103, 104, 105], [EOS], [110, 111, EOS],
                    [50, EOS], [60, 61], [70, 71, EOS], [80, 81, 82, EOS]]
# group 2 has a NaN ("no score"); group 3 agrees everywhere, so it carries no signal and the trainer skips it
STEP_REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, float("nan"), 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def reference_advantages(rewards: list[float], group_size: int, eps: float = 1e-6) -> list[float]:
    """(r − group mean) / (unbiased group std + eps) over each group's scored samples; NaN → 0."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        scored = [r for r in group if not math.isnan(r)]
        mean = sum(scored) / len(scored)
        std = math.sqrt(sum((r - mean) ** 2 for r in scored) / (len(scored) - 1))
        out += [0.0 if math.isnan(r) else (r - mean) / (std + eps) for r in group]
    return out


def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, from one unpadded forward of prompt + completion."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()  # [P + C, V]
    logits = logits[len(prompt) - 1:-1] / temperature  # [C, V]: position t predicts completion token t
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(completion)), completion]  # [C]


def reference_loss(model, rows: list[int], adv: list[float], old: list[torch.Tensor], rollout: list[torch.Tensor],
                   cfg) -> torch.Tensor:
    """PPO-clip surrogate with truncated importance weights, averaged over every completion token of `rows`."""
    total, n_tokens = 0.0, 0
    for i in rows:
        logp = reference_logprobs(model, STEP_PROMPTS[i // G], STEP_COMPLETIONS[i], cfg.temperature)
        ratio = torch.exp(logp - old[i])  # π_θ / π_old per token
        clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        surrogate = torch.minimum(ratio * adv[i], clipped * adv[i])  # the pessimistic bound
        weight = torch.exp(old[i] - rollout[i]).clamp(max=cfg.tis_cap)  # π_old / π_sampler, truncated
        total = total - (weight * surrogate).sum()
        n_tokens += len(logp)
    return total / n_tokens


def step_batch(rollout_logprobs: list[torch.Tensor]):
    """The rollout as the engine hands it to the trainer: left-padded prompts, right-padded completions."""
    from tinylora.generation.batch import Rollout
    P, C = max(map(len, STEP_PROMPTS)), max(map(len, STEP_COMPLETIONS))
    ids = torch.full((len(STEP_COMPLETIONS), P + C), PAD)
    amask = torch.zeros_like(ids)
    logp_roll = torch.zeros(len(STEP_COMPLETIONS), C)
    for i, completion in enumerate(STEP_COMPLETIONS):
        prompt = STEP_PROMPTS[i // G]
        ids[i, P - len(prompt):P], ids[i, P:P + len(completion)] = torch.tensor(prompt), torch.tensor(completion)
        amask[i, P - len(prompt):P + len(completion)] = 1
        logp_roll[i, :len(completion)] = rollout_logprobs[i].float()
    return Rollout(ids, amask, amask[:, P:].clone(), P, [""] * len(ids), logp_roll)


def test_a_grpo_step_matches_an_independent_implementation(tmp_path):
    from tinylora import AdapterConfig, attach
    from tinylora.tasks import Problem
    from tinylora.testing import tiny_model_and_tokenizer
    from tinylora.training.trainer import TrainConfig, Trainer

    # init 0.1: logits peaked enough that one update moves the token ratios past the clip range
    model, tok = tiny_model_and_tokenizer("qwen2", dtype=torch.float64, initializer_range=0.1)
    adapter = attach(model, AdapterConfig(u=2, n_tie=8))  # 3 groups of 2 numbers
    with torch.no_grad():
        adapter.v.copy_(torch.randn(adapter.v.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    # two epochs over the batch: the first update has ratio 1, the second sees the moved policy, so the clip acts;
    # micro_batch = G puts each group in its own forward, so the token mean must span micro-batches
    cfg = TrainConfig(batch_prompts=3, group_size=G, epochs=2, lr=0.1, warmup=0.0, grad_clip=0.0, eps_low=0.1,
                      eps_high=0.05, tis_cap=1.5, temperature=0.7, micro_batch=G, rollout_weights="hooks",
                      suffix="", system="")
    problems = [Problem(f"q{i}", "1") for i in range(3)]
    trainer = Trainer(model, tok, adapter, problems, cfg, tmp_path, progress=False)

    v0 = adapter.v.detach().clone()
    with torch.no_grad():  # π_old: the policy at v0, as the rollout saw it
        old = [reference_logprobs(model, STEP_PROMPTS[i // G], c, cfg.temperature) for i, c in
               enumerate(STEP_COMPLETIONS)]
    # the sampler's log-probs differ from π_old (as int8 rollouts would), so the importance weights vary and the
    # cap binds on some tokens
    shifts = [torch.empty(len(c), dtype=torch.float64).uniform_(-0.7, 0.7, generator=torch.Generator().manual_seed(i))
              for i, c in enumerate(STEP_COMPLETIONS)]
    rollout = [o - s for o, s in zip(old, shifts)]
    ro, rewards = step_batch(rollout), torch.tensor(STEP_REWARDS)
    trainer.rollout = lambda step, problems, round_=0: (ro, rewards)

    seen = []  # (v, gradient) at every optimizer update
    opt_step = trainer.opt.step

    def recording_step(*args, **kwargs):
        seen.append((adapter.v.detach().clone(), adapter.v.grad.detach().clone()))
        return opt_step(*args, **kwargs)
    trainer.opt.step = recording_step
    trainer.train_step(0)
    assert len(seen) == 2 and torch.equal(seen[0][0], v0)

    adv = reference_advantages(STEP_REWARDS, G)
    live = [i for i in range(len(adv)) if any(adv[(i // G) * G:(i // G + 1) * G])]  # groups with a signal
    assert live == list(range(8))  # the token mean is over these groups' tokens: the third adds nothing
    for v, grad in seen:
        with torch.no_grad():
            adapter.v.copy_(v)
        (expected,) = torch.autograd.grad(reference_loss(model, live, adv, old, rollout, cfg), adapter.v)
        # the library's log-probs are float32 (token_logprobs), the reference's float64
        torch.testing.assert_close(grad, expected.to(grad.dtype), rtol=1e-5, atol=1e-8)
    # AdamW's first update moves every number by lr against the sign of its gradient
    g0 = seen[0][1]
    torch.testing.assert_close(seen[1][0], v0 - cfg.lr * g0 / (g0.abs() + 1e-8), rtol=0, atol=1e-6)
    assert_the_step_exercises_clip_and_cap(model, seen[1][0], adapter, live, adv, old, rollout, cfg)


def assert_the_step_exercises_clip_and_cap(model, v, adapter, rows, adv, old, rollout, cfg):
    """The second update must have tokens clipped on each side, unclipped ones, and capped and uncapped importance
    weights, each clear of the boundary (float32 rounding cannot flip them), or the comparison above proves less."""
    with torch.no_grad():
        adapter.v.copy_(v)
        ratio = torch.cat([torch.exp(reference_logprobs(model, STEP_PROMPTS[i // G], STEP_COMPLETIONS[i],
                                                         cfg.temperature) - old[i]) for i in rows])
    A = torch.cat([torch.full((len(STEP_COMPLETIONS[i]),), adv[i]) for i in rows])
    weight = torch.cat([torch.exp(old[i] - rollout[i]) for i in rows])
    high, low = 1 + cfg.eps_high, 1 - cfg.eps_low
    assert ((A > 0) & (ratio > high)).any() and ((A < 0) & (ratio < low)).any()  # the clip binds on both sides
    assert ((ratio > low) & (ratio < high)).any()
    assert (weight > cfg.tis_cap).any() and (weight < cfg.tis_cap).any()
    for x, edge in ((ratio, high), (ratio, low), (weight, cfg.tis_cap)):
        assert (x - edge).abs().min() > 1e-4
