"""DAPO's dynamic sampling: train only on groups whose samples disagree, refilling until a step has B of them.

A group whose G samples all score the same has zero advantage: it costs its rollouts and adds nothing to the
gradient. `--dynamic-sampling` generates the step's B prompts, keeps the informative groups (at least two
scored samples, not all equal), and generates rounds of B more prompts until B groups are kept or
`max_gen_rounds` rounds have run (verl's `filter_groups` / `max_num_gen_batches`). At the cap the step trains
on the groups it has (fewer than B; none: the step makes no update). Round 0 draws exactly plain GRPO's
prompts with plain GRPO's sampling seed; later rounds draw from the pool with seeds fixed by (seed, step,
round), so a resumed run regenerates the same step.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from tinylora.generation.batch import Rollout, concat_rollouts
from tinylora.tasks import Problem
from tinylora.training.grpo import group_advantages


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] True where a group's scored samples do not all agree (it has a nonzero advantage). rewards [N]."""
    a = group_advantages(rewards, group_size, scale_by_std=False).view(-1, group_size)  # [B, G]
    return a.ne(0).any(dim=1)  # [B]


def refill_problems(problems: list[Problem], n: int, seed: int, step: int, round_: int) -> list[Problem]:
    """`n` problems for refill round `round_` of step `step`: a seeded draw from the whole pool."""
    rng = random.Random(f"refill/{seed}/{step}/{round_}")
    return [problems[rng.randrange(len(problems))] for _ in range(n)]


def take_groups(ro: Rollout, groups: list[int], group_size: int) -> Rollout:
    """The rows of the given groups, in that order."""
    rows = torch.tensor([g * group_size + j for g in groups for j in range(group_size)], dtype=torch.long)
    lp = ro.logp_rollout
    return Rollout(ro.input_ids[rows.to(ro.input_ids.device)], ro.attention_mask[rows.to(ro.input_ids.device)],
                   ro.completion_mask[rows.to(ro.input_ids.device)], ro.prompt_len,
                   [ro.completions[i] for i in rows.tolist()], lp[rows.to(lp.device)] if lp is not None else None)


def sample_informative(generate: Callable[[int], tuple[list[Problem], Rollout, torch.Tensor]], want: int,
                       group_size: int, max_rounds: int, pad_id: int):
    """Call `generate(round)` -> (problems, rollout, rewards [n·G]) until `want` informative groups are kept or
    `max_rounds` rounds ran. Returns (rollout of the kept groups, their rewards, their problems, every reward
    generated [all rounds], stats)."""
    kept_ro, kept_rewards, kept_problems, generated = [], [], [], []
    n_kept, rounds, ro, tokens = 0, 0, None, 0
    while rounds < max_rounds and n_kept < want:
        problems, ro, rewards = generate(rounds)
        rounds += 1
        tokens += int(ro.completion_mask.sum())
        generated.append(rewards)
        live = torch.nonzero(informative_groups(rewards, group_size)).flatten().tolist()[:want - n_kept]
        if live:
            kept_ro.append(take_groups(ro, live, group_size))
            kept_rewards.append(rewards.view(-1, group_size)[live].reshape(-1))
            kept_problems += [problems[g] for g in live]
            n_kept += len(live)
    all_rewards = torch.cat(generated)  # [rounds · n · G]
    stats = {"groups_kept": n_kept, "gen_rounds": rounds, "rollouts": len(all_rewards), "rollout_tokens": tokens}
    if not kept_ro:  # nothing informative within the cap: an empty batch (no update this step)
        return take_groups(ro, [], group_size), torch.empty(0), [], all_rewards, stats
    return concat_rollouts(kept_ro, pad_id), torch.cat(kept_rewards), kept_problems, all_rewards, stats
