"""Log-probabilities of given tokens under the model (with one row's adapter): one forward over the whole
sequence, every position's logits, exactly log_softmax at temperature 1 (no sampling law, no top-p).

What the server's `logprobs` / `echo` answer with, and what an evaluation harness reads a log-likelihood from:

    scores = token_logprobs(model, ids, bank=bank, R=R, start=1, top=5)
    scores.logprobs[i]                        # log p(ids[start + i] | ids[:start + i])
    scores.top_ids[i], scores.top_logprobs[i]  # the `top` most likely tokens at that position

Run it where nothing else uses the model at the same time (the server calls it on its engine thread).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Scores:
    logprobs: list[float]  # [n] of the given tokens ids[start:]
    top_ids: list[list[int]]  # [n][top] the most likely tokens at each of those positions, most likely first
    top_logprobs: list[list[float]]  # [n][top] their log-probabilities


def adapter_rows(bank, R: torch.Tensor | None):
    """The context a forward of one row runs in: `R` [n_modules, r, r] of the bank's adapter (None: the base
    model), set as the Engine sets a row's adapter. Without a bank: the model as it is."""
    if bank is None:
        return contextlib.nullcontext()
    return bank.adapter.per_row((R if R is not None else bank.zeros())[None])  # [1, M, r, r]


@torch.no_grad()
def token_logprobs(model, ids: list[int], *, bank=None, R: torch.Tensor | None = None, start: int = 1,
                   top: int = 0, chunk: int = 256) -> Scores:
    """log p(ids[j] | ids[:j]) for every j in [start, len(ids)), and the `top` most likely tokens there.

    One forward of ids[:-1] (positions 0, 1, ... as in a plain `model(input_ids)`), keeping only the logits of
    the positions asked for; log_softmax in float32, `chunk` positions at a time (each a [chunk, vocab] copy).
    `start` >= 1: the first token has no context and so no log-probability."""
    if start < 1:
        raise ValueError(f"start={start}: the first token has no log-probability (start >= 1)")
    n = len(ids) - start
    if n <= 0:
        return Scores([], [], [])
    device = next(model.parameters()).device
    x = torch.tensor([ids[:-1]], device=device)  # [1, L - 1]
    with adapter_rows(bank, R):
        logits = model(input_ids=x, use_cache=False, logits_to_keep=n).logits[0]  # [n, V] at start - 1 ... L - 2
    target = torch.tensor(ids[start:], device=device)  # [n]
    lps, top_ids, top_lps = [], [], []
    for i in range(0, n, chunk):
        lp = logits[i:i + chunk].float().log_softmax(dim=-1)  # [c, V]
        lps += lp.gather(1, target[i:i + chunk, None]).squeeze(1).tolist()
        if top > 0:
            values, which = lp.topk(min(top, lp.shape[-1]), dim=-1)  # [c, top]
            top_ids += which.tolist()
            top_lps += values.tolist()
    if top <= 0:
        top_ids, top_lps = [[] for _ in range(n)], [[] for _ in range(n)]
    return Scores(lps, top_ids, top_lps)
