"""Drawing tokens: exactly softmax(logits / T), optionally cut to the top-p nucleus, by inverse CDF from one
uniform per row (the Engine supplies the uniforms: from one seeded stream, or from each row's own)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

FIRST_K = 64  # candidates the nucleus search starts from (x8 per round for the rows they do not cover)


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor, first_k: int = FIRST_K) -> torch.Tensor:
    """Zero every token outside each row's nucleus: probs [n, V] (non-negative), top_p [n, 1] → [n, V] (not
    renormalised; `sample_categorical` draws from the remaining mass).

    The nucleus: rank tokens by probability (ties: lower id first) and keep each token whose higher-ranked
    tokens hold less than top_p. Each row's is found among its k most likely tokens (torch.topk, k = 64, then
    8x or more per round, below a quarter of the vocabulary) once those provably hold it, else (a nucleus
    that provably holds a quarter of the vocabulary, or many ties) by sorting the whole row
    (`top_p_sorted`, the plain definition); both give the same result bit for bit on a CPU, where a float32
    cumsum is sequential, so a prefix of the sorted row sums exactly as the whole row does up to there."""
    V = probs.shape[-1]
    out = torch.zeros_like(probs)
    rows = torch.arange(len(probs), device=probs.device)  # [r] the rows not done yet
    k, sort = first_k, []
    while len(rows) and 4 * k < V:
        done, kept, need = _top_p_among_top_k(probs[rows], top_p[rows], k)  # [r], [d, V], [r]
        out[rows[done]] = kept
        hopeless = ~done & (4 * need >= V)  # their nucleus holds at least a quarter of the row: sort them
        sort.append(rows[hopeless])
        rows, need = rows[~done & ~hopeless], need[~done & ~hopeless]
        k = max(8 * k, int(need.max()) if len(need) else 0)
    rows = torch.cat([rows, *sort])
    if len(rows) == len(probs):  # none found among its top k
        return top_p_sorted(probs, top_p)
    if len(rows):
        out[rows] = top_p_sorted(probs[rows], top_p[rows])
    return out


def top_p_sorted(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`top_p_filter` by a full sort of every row."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [n, V]; ties: lower id first
    before = sorted_p.cumsum(dim=-1) - sorted_p  # [n, V] mass of the tokens ranked above
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _top_p_among_top_k(probs: torch.Tensor, top_p: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows [n] whose nucleus the tokens at least as likely as their k-th (the candidates) provably hold,
    `top_p_filter` of those rows [d, V] from the candidates alone, and for every row a lower bound on its
    nucleus' size [n] (each token past the k-th adds at most the k-th's probability)."""
    n, V = probs.shape
    top = probs.topk(k, dim=-1).values  # [n, k]
    kth = top[:, -1:]  # [n, 1]
    mass = top.sum(dim=-1, keepdim=True)  # [n, 1]
    need = (k + (top_p - mass).clamp(min=0) / kth.clamp(min=torch.finfo(probs.dtype).tiny)).squeeze(1)  # [n]
    need = need.clamp(max=float(V)).floor()
    done = torch.zeros(n, dtype=torch.bool, device=probs.device)
    if not bool((mass - kth >= top_p).any()):  # no row has about enough mass in its top k
        return done, probs[:0], need
    candidate = probs >= kth  # [n, V] the top k, and every token tied with the k-th
    count = candidate.sum(dim=-1, keepdim=True)  # [n, 1]
    # worth the exact check: fewer candidates than a quarter of the row (ties), and about enough mass
    maybe = ((4 * count < V) & (mass - kth >= top_p)).squeeze(1)  # [n]
    if not bool(maybe.any()):
        return done, probs[:0], need
    rows = maybe.nonzero().squeeze(1)
    probs, top_p, kth, count, candidate = probs[rows], top_p[rows], kth[rows], count[rows], candidate[rows]
    p, ids = torch.where(candidate, probs, -1.0).topk(int(count.max()), dim=-1)  # [d, m]; -1: fillers
    ids, by_id = ids.sort(dim=-1)  # the full sort's order: probability descending, ties by id ascending
    p, rank = p.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, rank)  # [d, m] the candidates as the full sort ranks them first, fillers last
    total = p.cumsum(dim=-1)  # [d, m]: on the candidates, the full sort's cumsum (a prefix of it)
    # Every other token j has p_j < kth, and the full cumsum there is >= `last` (that at the last candidate),
    # so the mass ranked above j is >= fl(last - p_j) >= fl(last - kth): once that reaches top_p, j is out.
    last = total.gather(1, count - 1)  # [d, 1]
    holds = ((last - kth) >= top_p).squeeze(1)  # [d]
    done[rows[holds]] = True
    kept = p.masked_fill((total - p >= top_p) | (p < 0), 0.0)[holds]  # [d', m]
    return done, torch.zeros_like(probs[holds]).scatter(-1, ids[holds], kept), need


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


def pick_tokens(logits: torch.Tensor, rows: list, shared: list[torch.Generator] | None,
                best: torch.Tensor | None = None):
    """One token per row [n] from logits [n, V] under each row's `sampling` (temperature 0: greedy), and its
    log-prob under the sampling law [n] (None if all greedy). `rows`: the engine's Sequences; `shared`: the
    seeded streams of a `generate` call (None: every row draws from its own generator); `best`: each row's
    argmax [n] when the caller has it already."""
    temps = [s.sampling.temperature for s in rows]
    greedy = [t == 0 for t in temps]
    if best is None and any(greedy):
        best = logits.argmax(-1)  # [n]
    if all(greedy):
        return best, None
    if len(set(temps)) == 1:  # one temperature (rollouts): divide by the number itself
        probs = torch.softmax(logits.float() / temps[0], dim=-1)  # [n, V]
    else:
        t = torch.tensor([x if x > 0 else 1.0 for x in temps], device=logits.device)[:, None]  # [n, 1]
        probs = torch.softmax(logits.float() / t, dim=-1)  # [n, V]
    nucleus = [i for i, s in enumerate(rows) if s.sampling.top_p < 1]
    if nucleus:
        idx = torch.tensor(nucleus, device=logits.device)
        top_p = torch.tensor([rows[i].sampling.top_p for i in nucleus], device=logits.device)[:, None]
        probs[idx] = top_p_filter(probs[idx], top_p)
    tok = sample_categorical(probs, uniforms(rows, shared, logits.device))  # [n]
    logp = probs.gather(1, tok[:, None]).squeeze(1).log()  # [n]
    if any(greedy):
        tok = torch.where(torch.tensor(greedy, device=tok.device), best, tok)
    return tok, logp


def uniforms(rows: list, shared: list[torch.Generator] | None, device) -> torch.Tensor:
    """One uniform in [0, 1) per row [n, 1]: from the shared seeded streams (each row from its `stream`, in
    order, so each stream's rows draw what they would alone), or from each row's own generator."""
    n = len(rows)
    if shared is not None and all(s.generator is None for s in rows):
        if len(shared) == 1:
            return torch.rand(n, 1, generator=shared[0], device=device)
        u = torch.empty(n, 1, device=device)
        streams = torch.tensor([s.stream for s in rows])  # [n]
        for k, gen in enumerate(shared):
            mine = (streams == k).nonzero().flatten()
            if len(mine):
                u[mine.to(device)] = torch.rand(len(mine), 1, generator=gen, device=device)
        return u
    u = torch.cat([torch.rand(1, generator=s.generator) for s in rows])  # [n]
    return u[:, None].to(device)
