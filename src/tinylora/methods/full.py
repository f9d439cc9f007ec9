"""Full fine-tuning (every base weight trained) and frozen (nothing trained: the base model, for evaluation).
Neither adapts targets with hooks."""

from __future__ import annotations

from torch import nn

from tinylora.methods.base import Method


class Frozen(Method):
    name = "frozen"

    def targets(self, model: nn.Module, config) -> list:
        return []


class Full(Frozen):
    name = "full"
    trains_base = True

    def count(self, targets, config, total_params: int | None = None) -> int:
        if total_params is None:
            raise ValueError("counting 'full' needs the model's total parameter count")
        return total_params

    def state(self, adapter) -> dict:
        return {k: v.detach() for k, v in adapter.base_model.state_dict().items()}

    def trainable_parameters(self, adapter) -> list[nn.Parameter]:
        return list(adapter.base_model.parameters())
