"""int8 weights for fast CPU rollouts.

On a CPU without bf16 kernels, fp32 generation reads 4 bytes per weight and runs fp32 GEMMs at a
fraction of peak at decode batch sizes. PyTorch's fbgemm int8 kernels (per-output-channel int8
weights, activations quantized on the fly) measured 4.5× the fp32 throughput at the GRPO decode shape
[32 × 896] · [896 × 4864] on the project's AVX2 machine (213 vs 47 GFLOP/s).

The base weights are quantized once; the adapter keeps running as its fp32 hook on top
(y = Q(W) x + s·UΣRVᵀ x), so nothing is re-quantized when v changes. Rollouts then sample from a
policy that differs from the fp32 training policy by the weight rounding only; the trainer's
truncated importance weights correct for that, as the paper does for its vLLM rollouts.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn


def available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8: [out, in] fp32 → quantized tensor (scale = max|row| / 127)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # [out]
    zero = torch.zeros_like(scale, dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated upstream; torch is pinned here
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, scale, zero, axis=0, dtype=torch.qint8)


class Int8Weights:
    """int8 copies of every nn.Linear of a model, swapped in by `with weights.active(): ...`.

    Module objects stay the same (only their forward changes while active), so forward hooks,
    the adapter's included, keep firing. Costs one int8 copy of the linear weights (¼ of fp32).
    """

    def __init__(self, model: nn.Module):
        if not available():
            raise RuntimeError("int8 rollouts need PyTorch's fbgemm engine (x86 CPU); use --rollout-weights merged")
        torch.backends.quantized.engine = "fbgemm"
        self.model = model
        self.packed: dict[str, object] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.weight.device.type == "cpu":
                self.packed[name] = torch.ops.quantized.linear_prepack(quantize_weight(mod.weight), None)

    @contextlib.contextmanager
    def active(self):
        mods = {name: self.model.get_submodule(name) for name in self.packed}
        try:
            for name, mod in mods.items():
                mod.forward = _int8_forward(self.packed[name], mod.bias, mod.weight.dtype)
            yield self
        finally:
            for mod in mods.values():
                mod.__dict__.pop("forward", None)


def _int8_forward(packed, bias: torch.Tensor | None, dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        # fbgemm quantizes activations with one scale per call; a few tokens (the first of each
        # sequence) carry activations ~100× the rest and would flatten everyone else's. Scaling each
        # token to max |x| = 1 first makes that scale per token (the mean per-token log-prob gap to
        # fp32 on the default model fell from 0.90 to 0.086 nats).
        x = x.float()
        norm = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # [..., 1]
        # reduce_range: 7-bit activations, which fbgemm's AVX2 kernels need to avoid overflow
        y = torch.ops.quantized.linear_dynamic(x / norm, packed, True) * norm  # [..., out]
        return (y if bias is None else y + bias).to(dtype)
    return forward
