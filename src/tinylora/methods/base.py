"""What every adaptation method answers. The shared machinery (targets, tying plan, SVD cache, forward hooks,
merge, files) asks a method these questions and never switches on its name.

A method is a stateless object; the tensors it creates live on the `Adapter` (so `adapter.parameters()` and
`.to(device)` see them). `config` arguments are `AdapterConfig`s.
"""

from __future__ import annotations

import torch
from torch import nn

from tinylora.adapter.plan import Target, find_targets


class Method:
    name = ""
    uses_svd = False  # frozen truncated SVD factors U, Σ, V per target (computed, cached, hashed by the adapter)
    single_v = False  # everything trained is one tensor v [n_groups, k]: banks, packs and `info` work on v alone
    trains_base = False  # the base weights themselves change: a weight copy taken once goes stale
    settings: tuple[str, ...] = ()  # the AdapterConfig fields that shape it (besides targets)

    def scale(self, config) -> float:
        """s in W' = W + s·ΔW."""
        return 1.0

    def numbers_per_group(self, config) -> int:
        """Trainable numbers in one tied group (single-v methods)."""
        return 0

    def targets(self, model: nn.Module, config) -> list[Target]:
        return find_targets(model, config.targets)

    def groups(self, targets: list[Target], config) -> list[list[int]]:
        """Which targets share trainable numbers: by default none do."""
        return [[i] for i in range(len(targets))]

    def count(self, targets: list[Target], config, total_params: int | None = None) -> int:
        return 0

    def frozen_factors(self, config, target: Target) -> dict[str, torch.Tensor]:
        """Fixed tensors of one target besides its SVD factors (e.g. TinyLoRA's P)."""
        return {}

    def create_parameters(self, adapter) -> dict[str, nn.Module | nn.Parameter]:
        """The trainable tensors, by attribute name, at their starting values (ΔW = 0)."""
        return {}

    def add_delta(self, adapter, i: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """output + ΔW x of target i: what the forward hook returns."""
        return output

    def delta_weight(self, adapter, i: int) -> torch.Tensor:
        """ΔW of target i in float32 [out, in], s included (merging and export)."""
        raise ValueError(f"method {self.name!r} adds no ΔW to a target")

    def lora_factors(self, adapter, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) with B @ A = ΔW of target i: the PEFT LoRA export."""
        raise ValueError(f"method {self.name!r} has no LoRA form; export a merged model instead")

    def state(self, adapter) -> dict[str, torch.Tensor]:
        """Everything trained, by stable names: what an adapter file holds."""
        return {}

    def trainable_parameters(self, adapter) -> list[nn.Parameter]:
        return [p for p in adapter.parameters() if p.requires_grad]
