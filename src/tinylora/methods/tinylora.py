"""TinyLoRA: W' = W + s · U Σ R Vᵀ with R = Σ_i v_i P_i (arXiv 2602.04118).

U, Σ, V: the frozen rank-r truncated SVD of W. P [u, r, r]: fixed N(0, 1) projections regenerated from
(seed, module name), never stored. v [u]: the only trainable numbers, zero at start, one per tied group of
n_tie modules. s = 1/√u keeps R's size independent of u when every v_i moves by about the same step (Adam).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from tinylora.adapter.plan import Target, tie_groups
from tinylora.methods.base import Method
from tinylora.models import DTYPES


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, module name): P is regenerated, never stored."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def mix(v: torch.Tensor, P: torch.Tensor, scale: float) -> torch.Tensor:
    """s·R = s · Σ_k v_k P_k: v [..., k], P [..., k, r, r] → [..., r, r]. The one place R is formed."""
    return scale * torch.einsum("...k,...kij->...ij", v.float(), P)


class TinyLoRA(Method):
    name = "tinylora"
    uses_svd = True
    single_v = True
    settings = ("r", "u", "n_tie", "tie", "seed", "v_dtype", "svd")

    def scale(self, config) -> float:
        return 1.0 / math.sqrt(config.u)

    def numbers_per_group(self, config) -> int:
        return config.u

    def projections(self, config, name: str) -> torch.Tensor:
        """The fixed P [k, r, r] of one module."""
        g = torch.Generator().manual_seed(module_seed(config.seed, name))
        return torch.randn(config.u, config.r, config.r, generator=g, dtype=torch.float32)

    def groups(self, targets: list[Target], config) -> list[list[int]]:
        return tie_groups(targets, config.n_tie, config.tie)

    def count(self, targets: list[Target], config, total_params: int | None = None) -> int:
        return len(self.groups(targets, config)) * self.numbers_per_group(config)

    def frozen_factors(self, config, target: Target) -> dict[str, torch.Tensor]:
        return {"P": self.projections(config, target.name)}

    def create_parameters(self, adapter) -> dict[str, nn.Parameter]:
        # one tensor for all groups: a single optimizer entry and a single tensor in the file
        config = adapter.config
        v = torch.zeros(len(adapter.groups), self.numbers_per_group(config), dtype=DTYPES[config.v_dtype],
                        device=adapter.device)  # [n_groups, k]
        return {"v": nn.Parameter(v)}

    def add_delta(self, adapter, i: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return adapter.add_svd_delta(i, x, output)

    def delta_weight(self, adapter, i: int) -> torch.Tensor:
        f = adapter.factors[i]
        return (f.U * f.S) @ adapter.R(i) @ f.V.T  # [out, in]

    def lora_factors(self, adapter, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = adapter.factors[i]
        A = (f.S[:, None] * adapter.R(i)) @ f.V.T  # [r, r] @ [r, in]
        return A, f.U.clone()

    def state(self, adapter) -> dict[str, torch.Tensor]:
        return {"v": adapter.v.detach()}
