"""Drawing tokens: exactly softmax(logits / T), optionally cut to the top-p nucleus, by inverse CDF from one
uniform per row (the Engine supplies the uniforms: from one seeded stream, or from each row's own)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside each row's nucleus: probs [n, V], top_p [n, 1] → [n, V] (not renormalised;
    `sample_categorical` draws from the remaining mass)."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [n, V]; ties: lower id first
    before = sorted_p.cumsum(dim=-1) - sorted_p  # [n, V] mass of the tokens ranked above
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def sample_categorical(probs: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """One draw per row from probs [n, V] (unnormalised is fine) by inverse CDF at the uniforms u [n, 1], in
    two levels: a block of `block` entries, then an entry inside it. Same law as torch.multinomial, far
    faster at a large vocab: multinomial draws an exponential variate for every entry (32 × 152k per decode
    step, on one thread); here two short cumsums stand in for one 152k-long serial one.
    Zero-probability entries (and the padding) are never drawn.
    """
    n, V = probs.shape
    blocks = F.pad(probs.float(), (0, -V % block)).view(n, -1, block)  # [n, nb, block]
    cdf = blocks.sum(-1).cumsum(-1)  # [n, nb]
    u = u * cdf[:, -1:]  # [n, 1]
    b = torch.searchsorted(cdf, _below(u, cdf), right=True)  # [n, 1] first block whose cdf exceeds u
    u = u - torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)  # [n, 1] offset into the block
    inner = blocks[torch.arange(n, device=probs.device), b.squeeze(1)].cumsum(-1)  # [n, block]
    i = torch.searchsorted(inner, _below(u, inner), right=True)  # [n, 1]
    return (b * block + i).squeeze(1)  # [n]


def _below(u: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """u [n, 1] clamped into [0, total) of cdf [n, m], against rounding: searchsorted(right=True) then
    lands on an entry with positive mass."""
    return torch.minimum(u.clamp(min=0), torch.nextafter(cdf[:, -1:], torch.zeros_like(u)))
