"""Deterministic rank-r truncated SVD of frozen weights, with an on-disk cache.

The adapter file stores only v, so U, Σ, V must come out identical on every machine. Three things
make them so: the SVD runs in float64 and is rounded to float32 (thread-count noise lives far below
fp32 precision); each singular pair gets a canonical sign (the largest-|.| entry of u_j is
positive); and the randomized variant draws its test matrix from a fixed seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from tinylora.atomic import atomic_write_bytes
from tinylora.cache import cache_root

RANDOMIZED_SEED = 42  # fixed: part of the SVD definition, not a user knob
RANDOMIZED_OVERSAMPLE = 8
RANDOMIZED_POWER_ITERS = 6


def canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_j, v_j) so that the largest-magnitude entry of u_j is positive."""
    idx = U.abs().argmax(dim=0)  # [r]
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])  # [r]
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def truncated_svd(W: torch.Tensor, r: int, mode: str = "full") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return U [out, r], S [r], V [in, r] in float32 with W ≈ U diag(S) Vᵀ."""
    A = W.detach().to(device="cpu", dtype=torch.float64)  # [out, in]
    r = min(r, *A.shape)
    if mode == "full":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    elif mode == "randomized":
        U, S, Vh = _randomized_svd(A, r)
    else:
        raise ValueError(f"unknown SVD mode {mode!r}: expected 'full' or 'randomized'")
    U, Vh = canonical_signs(U, Vh)
    return U.float().contiguous(), S.float().contiguous(), Vh.T.float().contiguous()


def _randomized_svd(A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al. range finder with power iterations and a seeded Gaussian test matrix."""
    q = min(r + RANDOMIZED_OVERSAMPLE, *A.shape)
    g = torch.Generator().manual_seed(RANDOMIZED_SEED)
    omega = torch.randn(A.shape[1], q, generator=g, dtype=torch.float64)  # [in, q]
    Q, _ = torch.linalg.qr(A @ omega)  # [out, q]
    for _ in range(RANDOMIZED_POWER_ITERS):
        Z, _ = torch.linalg.qr(A.T @ Q)  # [in, q]
        Q, _ = torch.linalg.qr(A @ Z)  # [out, q]
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)  # [q, q], [q], [q, in]
    return (Q @ Ub)[:, :r], S[:r], Vh[:r]


def weight_digest(W: torch.Tensor) -> str:
    """Hash of a tensor's exact bytes, dtype and shape (the cache key and fingerprint)."""
    t = W.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(_int_of_size(t.element_size()))
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(raw.numpy().tobytes())
    return h.hexdigest()


def _int_of_size(n: int) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[n]


def cache_dir() -> Path:
    return cache_root() / "svd"


def cached_svd(W: torch.Tensor, r: int, mode: str, digest: str | None = None, use_cache: bool = True):
    """truncated_svd, memoised on disk by the weight's digest so a second start skips the work."""
    if not use_cache:
        return truncated_svd(W, r, mode)
    digest = digest or weight_digest(W)
    path = cache_dir() / f"{digest}-{mode}-r{r}.safetensors"
    if path.exists():
        try:
            f = load_file(str(path))
            return f["U"], f["S"], f["V"]
        except Exception:  # a torn or foreign file: recompute and overwrite
            pass
    U, S, V = truncated_svd(W, r, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"U": U, "S": S, "V": V}))  # a concurrent reader never sees half a file
    return U, S, V
