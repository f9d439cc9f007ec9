"""Whole prompts of very different lengths are prefilled in groups of similar length (generation/kv.py).

The grouping is checked against a brute force over every partition of the rows; that the engine's tokens stay
those of `model.generate` with the groups in use is checked in tests/test_against_generate.py."""

from __future__ import annotations

import random

import pytest
import torch

from tinylora.generation import kv
from tinylora.testing import tiny_model_and_tokenizer


def partitions(items: list[int]):
    """Every set partition of `items` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        yield [[first], *p]
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1:]]


def cost_of(groups: list[list[int]], lengths: list[int], per_forward: int) -> int:
    return sum(per_forward + len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(30))
def test_length_buckets_are_the_cheapest_partition(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 3, 8, 9, 30, 31, 60]) for _ in range(rng.randint(1, 7))]
    per_forward = rng.choice([0, 5, 20, 64])
    best = min(cost_of(p, lengths, per_forward) for p in partitions(list(range(len(lengths)))))
    buckets = kv.length_buckets(lengths, per_forward)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))  # every row exactly once
    assert cost_of(buckets, lengths, per_forward) == best


def test_length_buckets_by_hand():
    assert kv.length_buckets([29, 50, 29, 48], 64) == [[0, 1, 2, 3]]  # 264 tokens in one batch against 286 in two
    assert kv.length_buckets([10] * 4 + [100] * 4, 64) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 568 against 864
    assert kv.length_buckets([5, 5, 7], 0) == [[0, 1], [2]]


@torch.no_grad()
def test_bucketed_prefill_gives_the_cache_and_logits_of_each_prompt_alone(monkeypatch):
    """Against each prompt run alone, unpadded: its last logits, and its keys and values right-aligned in the
    merged cache with zeros before them."""
    model, tok = tiny_model_and_tokenizer("qwen2")
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=gen) for n in (2, 9, 2, 9, 5)]
    P = 9
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = p, 1
    monkeypatch.setattr(kv, "BUCKET_COST", 0)
    assert len(kv.length_buckets(mask.sum(dim=1).tolist())) == 3
    run = kv.Prefill(model, ids, mask)
    logits = run.advance()  # [b, 1, V]
    assert run.finished
    for i, p in enumerate(prompts):
        alone = model(input_ids=p[None], use_cache=True)
        torch.testing.assert_close(logits[i, -1], alone.logits[0, -1], rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(run.cache.layers, alone.past_key_values.layers):
            torch.testing.assert_close(mine.keys[i, :, P - len(p):], theirs.keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values[i, :, P - len(p):], theirs.values[0], rtol=1e-5, atol=1e-5)
            assert not mine.keys[i, :, :P - len(p)].any()
