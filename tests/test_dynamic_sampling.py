"""DAPO dynamic sampling: groups whose samples all agree never reach the loss; refills stop at their cap."""

import pytest
import torch
from test_train import PROBLEMS, make_trainer, small_cfg

from tinylora.generation.batch import Rollout, concat_rollouts
from tinylora.tasks import Problem
from tinylora.tasks.rewards import pairwise
from tinylora.training import grpo
from tinylora.training.dynamic_sampling import informative_groups, refill_problems, sample_informative

G = 2


def test_informative_groups_by_hand():
    nan = float("nan")
    rewards = torch.tensor([1, 1,  0, 1,  0, 0,  nan, 1,  nan, nan,  0.5, 0.25])  # 6 groups of 2
    assert informative_groups(rewards, G).tolist() == [False, True, False, False, False, True]


def fake_round(rewards_per_round, prompt_lens):
    """generate(round) for sample_informative: round k has the given rewards and prompt length."""
    def generate(k):
        r = torch.tensor(rewards_per_round[k], dtype=torch.float)
        n, P, C = len(r), prompt_lens[k], 3
        ids = torch.arange(n * (P + C)).view(n, P + C) + 1000 * k
        ro = Rollout(ids, torch.ones(n, P + C, dtype=torch.long), torch.ones(n, C, dtype=torch.long), P,
                     [f"r{k}s{i}" for i in range(n)], torch.full((n, C), -float(k)))
        return [Problem(f"round {k} group {g}", "0") for g in range(n // G)], ro, r
    return generate


def test_refill_until_full_and_only_informative_groups_are_kept():
    rounds = [[1, 1, 0, 1, 0, 0],  # one informative group (1)
              [0, 0, 1, 0, 1, 1],  # one more (1)
              [0, 1, 1, 0, 0, 0]]  # two: only one is needed
    ro, rewards, problems, generated, stats = sample_informative(fake_round(rounds, [4, 6, 5]), 3, G, 5, pad_id=7)
    assert stats == {"groups_kept": 3, "gen_rounds": 3, "rollouts": 18, "rollout_tokens": 54}
    assert [p.question for p in problems] == ["round 0 group 1", "round 1 group 1", "round 2 group 0"]
    assert rewards.tolist() == [0, 1, 1, 0, 0, 1]
    assert not (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(dim=1).any()  # no tied group
    assert ro.completions == ["r0s2", "r0s3", "r1s2", "r1s3", "r2s0", "r2s1"]
    assert ro.prompt_len == 6 and ro.input_ids.shape == (6, 9)
    assert ro.input_ids[0, :2].tolist() == [7, 7] and ro.attention_mask[0, :2].tolist() == [0, 0]  # left-padded
    assert ro.logp_rollout[:, 0].tolist() == [0, 0, -1, -1, -2, -2]
    assert len(generated) == 18


def test_the_cap_stops_the_refill_and_an_empty_step_is_empty():
    ties = [[1, 1, 0, 0]] * 10
    ro, rewards, problems, _, stats = sample_informative(fake_round(ties, [3] * 10), 2, G, 3, pad_id=0)
    assert stats["gen_rounds"] == 3 and stats["groups_kept"] == 0 and stats["rollouts"] == 12
    assert ro.input_ids.shape[0] == 0 and problems == [] and len(rewards) == 0
    mixed = [[1, 0, 1, 1]] + ties
    _, _, problems, _, stats = sample_informative(fake_round(mixed, [3] * 11), 2, G, 2, pad_id=0)
    assert stats["gen_rounds"] == 2 and stats["groups_kept"] == 1  # at the cap: trains on the one it has


def test_refill_draws_are_seeded():
    a = refill_problems(PROBLEMS, 4, seed=0, step=3, round_=1)
    assert a == refill_problems(PROBLEMS, 4, seed=0, step=3, round_=1)
    assert a != refill_problems(PROBLEMS, 4, seed=0, step=3, round_=2)


def test_concat_keeps_every_row_whole():
    gen = fake_round([[1, 0], [0, 1]], [2, 4])
    (_, a, _), (_, b, _) = gen(0), gen(1)
    c = concat_rollouts([a, b], pad_id=9)
    assert c.input_ids[0, 2:].tolist() == a.input_ids[0].tolist() and c.input_ids[2].tolist() == b.input_ids[0].tolist()


def problem_gated_reward(completion, gold):
    """Problems whose gold is "tie" always score 0 (a group that ties); the others score by completion length."""
    return 0.0 if gold == "tie" else float(len(completion.split()) % 2)


def test_tied_groups_never_reach_the_loss_in_training(tmp_path, monkeypatch):
    problems = [Problem(p.question, "tie" if i % 2 else "0", p.solution) for i, p in enumerate(PROBLEMS)]
    seen = []
    real = grpo.policy_loss

    def spy(logp, old, adv, mask, **kw):
        seen.append(adv.detach().clone())
        return real(logp, old, adv, mask, **kw)
    monkeypatch.setattr("tinylora.training.trainer.policy_loss", spy)
    # beta > 0: plain GRPO would send tied groups through the loss for their KL term
    trainer = make_trainer(tmp_path, small_cfg(steps=3, dynamic_sampling=True, max_gen_rounds=4, beta=0.1,
                                               micro_batch=4, group_size=4), reward=problem_gated_reward)
    trainer.problems = problems
    history = trainer.fit()
    for adv in seen:
        assert adv.view(-1, 4).ne(0).any(dim=1).all()  # every group in the loss has a nonzero advantage
    for m in history:
        assert 1 <= m["gen_rounds"] <= 4 and m["groups_kept"] <= 4 and m["rollouts"] == 16 * m["gen_rounds"]
        assert m["groups_kept"] == 4 or m["gen_rounds"] == 4


@pytest.mark.slow
def test_dynamic_sampling_resumes_exactly(tmp_path):
    cfg = small_cfg(steps=4, dynamic_sampling=True, max_gen_rounds=3)
    full = make_trainer(tmp_path / "a", cfg)
    full.reward = pairwise(problem_gated_reward)
    full.fit()
    cut = make_trainer(tmp_path / "b", cfg)
    cut.reward = pairwise(problem_gated_reward)
    cut.fit(on_step=lambda m: setattr(cut, "stop_requested", m["step"] == 1))
    resumed = make_trainer(tmp_path / "b", cfg)
    resumed.reward = pairwise(problem_gated_reward)
    resumed.fit(resume=True)
    assert torch.equal(resumed.adapter.v, full.adapter.v)


def test_dynamic_sampling_is_grpo_only():
    with pytest.raises(ValueError, match="dynamic_sampling"):
        small_cfg(algo="sft", dynamic_sampling=True)
