"""LoRA: W' = W + s · B A, A [r, in] Kaiming-uniform (seeded per module), B [out, r] zero, s = alpha / r."""

from __future__ import annotations

import math

import torch
from torch import nn

from tinylora.adapter.plan import Target
from tinylora.methods.base import Method
from tinylora.methods.tinylora import module_seed


class LoRA(Method):
    name = "lora"
    settings = ("r", "seed", "lora_alpha")

    def scale(self, config) -> float:
        return (config.lora_alpha if config.lora_alpha is not None else config.r) / config.r

    def count(self, targets: list[Target], config, total_params: int | None = None) -> int:
        return sum(config.r * (out + inp) for out, inp in (t.shape for t in targets))

    def create_parameters(self, adapter) -> dict[str, nn.ParameterList]:
        r, device = adapter.config.r, adapter.device
        A_list, B_list = nn.ParameterList(), nn.ParameterList()
        for t in adapter.targets:
            out_f, in_f = t.shape
            A = torch.empty(r, in_f)
            g = torch.Generator().manual_seed(module_seed(adapter.config.seed, t.name))
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
            A_list.append(nn.Parameter(A.to(device)))
            B_list.append(nn.Parameter(torch.zeros(out_f, r, device=device)))
        return {"lora_A": A_list, "lora_B": B_list}

    def add_delta(self, adapter, i: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        A, B = adapter.lora_A[i], adapter.lora_B[i]
        return output + adapter.config.scale * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T)

    def delta_weight(self, adapter, i: int) -> torch.Tensor:
        return adapter.config.scale * (adapter.lora_B[i].float() @ adapter.lora_A[i].float())

    def lora_factors(self, adapter, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return adapter.config.scale * adapter.lora_A[i].detach().float(), adapter.lora_B[i].detach().float()

    def state(self, adapter) -> dict[str, torch.Tensor]:
        state = {}
        for t, A, B in zip(adapter.targets, adapter.lora_A, adapter.lora_B):
            state[f"{t.name}.lora_A"] = A.detach()
            state[f"{t.name}.lora_B"] = B.detach()
        return state
