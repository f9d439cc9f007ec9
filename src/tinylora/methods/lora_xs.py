"""LoRA-XS: TinyLoRA's frozen SVD factors with the whole r×r R trained (P is the standard basis of r×r
matrices, so v is R itself), s = 1."""

from __future__ import annotations

import torch

from tinylora.methods.tinylora import TinyLoRA


class LoRAXS(TinyLoRA):
    name = "lora-xs"
    settings = ("r", "n_tie", "tie", "v_dtype", "svd")

    def scale(self, config) -> float:
        return 1.0

    def numbers_per_group(self, config) -> int:
        return config.r * config.r

    def projections(self, config, name: str) -> torch.Tensor:
        r = config.r
        return torch.eye(r * r).view(r * r, r, r)
