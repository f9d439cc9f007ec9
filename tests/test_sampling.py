"""The nucleus (top-p) filter found among each row's top k tokens equals, bit for bit, the plain full-sort one."""

import pytest
import torch

from tinylora.generation import sampling
from tinylora.generation.sampling import top_p_filter


def reference_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The implementation top_p_filter had before it avoided the full sort, kept here verbatim as the reference."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [n, V]; ties: lower id first
    before = sorted_p.cumsum(dim=-1) - sorted_p  # [n, V] mass of the tokens ranked above
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def distributions(seed: int, n: int, V: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "zipf":  # what a language model's next-token law looks like: a few likely tokens, a long tail
        ranks = torch.arange(1, V + 1, dtype=torch.float32)
        logits = torch.stack([-(1.0 + i / n) * ranks.log()[torch.randperm(V, generator=g)] for i in range(n)])
    else:
        scale = {"flat": 0.3, "normal": 3.0, "sharp": 12.0}[kind]
        logits = torch.randn(n, V, generator=g) * scale
    if seed % 2:  # ties: many tokens share one probability (ties at the nucleus' edge included)
        logits = (logits * 2).round() / 2
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("V", [7, 100, 1000, 20000, 152064])
@pytest.mark.parametrize("kind", ["flat", "normal", "sharp", "zipf"])
def test_top_p_filter_equals_the_full_sort(V, kind):
    for seed in range(4):
        probs = distributions(seed + V, 6, V, kind)
        top_p = torch.tensor([[0.01], [0.3], [0.5], [0.9], [0.95], [1 - 1e-7]])  # [6, 1]
        assert torch.equal(top_p_filter(probs, top_p), reference_top_p(probs, top_p)), (V, kind, seed)
        for first_k in (1, 2, 5):  # more rounds of the search
            assert torch.equal(top_p_filter(probs, top_p, first_k=first_k), reference_top_p(probs, top_p))


def test_ties_at_the_edge_of_the_nucleus_keep_the_lower_ids():
    probs = torch.tensor([[0.1] * 10, [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0]])
    probs = torch.cat([probs, torch.zeros(2, 990)], dim=1)  # room for the top-k search (4k < V)
    for p in (0.05, 0.25, 0.35, 0.5, 0.6):
        top_p = torch.full((2, 1), p)
        got = top_p_filter(probs, top_p, first_k=2)
        assert torch.equal(got, reference_top_p(probs, top_p))
        kept = got[0].nonzero().flatten().tolist()
        assert kept == list(range(len(kept)))  # equal probabilities: the lower ids stay


def test_random_laws_and_random_top_p_per_row():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        V = int(torch.randint(2, 5000, (1,), generator=g))
        n = int(torch.randint(1, 9, (1,), generator=g))
        probs = torch.softmax(torch.randn(n, V, generator=g) * float(torch.rand(1, generator=g) * 15), dim=-1)
        if trial % 3 == 0:
            probs = torch.softmax((probs.log() * 2).round() / 2, dim=-1)
        if trial % 5 == 0:
            probs = probs * 0.7  # unnormalised (the engine's masses need not sum to 1)
        top_p = torch.rand(n, 1, generator=g).clamp(min=1e-3)
        assert torch.equal(top_p_filter(probs, top_p, first_k=4), reference_top_p(probs, top_p)), trial


def test_a_peaked_row_is_not_sorted_whole(monkeypatch):
    """The point of it: on a language model's kind of law the nucleus comes from torch.topk, no full sort."""
    calls = []
    monkeypatch.setattr(sampling, "top_p_sorted", lambda probs, top_p: calls.append(len(probs)))
    probs = distributions(0, 8, 152064, "sharp")
    top_p = torch.full((8, 1), 0.9)
    out = top_p_filter(probs, top_p)
    assert calls == [] and torch.equal(out, reference_top_p(probs, top_p))
    flat = distributions(0, 2, 152064, "flat")  # a nucleus of most of the vocabulary: sorted after all
    top_p_filter(flat, torch.full((2, 1), 0.9))
    assert calls == [2]


def test_max_over_the_vocabulary_picks_what_argmax_picks_on_ties():
    """The engine takes greedy's token from `max(dim=-1)` (one pass with its finiteness check): on ties it must
    be the lowest id, as argmax and `model.generate`."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (64, 151_936), generator=gen).float()  # ties everywhere: three values
    logits[5, 100_000] = 7.0  # a single max late in a row
    logits[6, 17] = logits[6, 150_000] = 9.0  # two tied maxima far apart
    logits[7] = -float("inf")
    logits[7, 42] = logits[7, 43] = 0.5  # a row of -inf but two finite entries
    assert torch.equal(logits.max(dim=-1).indices, logits.argmax(dim=-1))
    assert logits.max(dim=-1).indices[6] == 17 and logits.max(dim=-1).indices[7] == 42
    lowest = torch.stack([(row == row.max()).nonzero()[0, 0] for row in logits])
    assert torch.equal(logits.max(dim=-1).indices, lowest)
    nan = logits.clone()
    nan[3, 5] = float("nan")
    assert torch.isnan(nan.max(dim=-1).values[3])  # NaN reaches the max: the engine's check sees it
