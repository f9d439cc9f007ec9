"""How a model generates under an adapter: one `GenerationWeights` object, chosen once by `for_generation`
from the device, the dtype, the free memory and what the caller asked. Trainer, evaluation and server take it
and generate inside `weights.generating(adapter)`, which prepares the model and undoes it after.

- `Merged`: ΔW folded into the weights for the block (`exact`: restored bit for bit after, as training needs).
- `AdapterHooks`: the model's own weights, the adapter as hooks, as in training: exact in any dtype.
- `PackedWeights`: at decode batch sizes (M = B·G ≈ 32 rows) PyTorch's default fp32 GEMM re-packs every
  weight matrix on every call and runs at a third of this machine's matmul peak; this copy is pre-packed once
  in oneDNN's blocked layout (the op torch.compile's CPU freezing pass uses). Exact up to summation order;
  faster than merged at rollout batch sizes (BENCHMARKS.md). Costs one more fp32 copy of the linear weights.
- `Int8Weights`: fbgemm int8 weights (per-output-channel), activations quantized on the fly: faster
  still, but the rollout policy differs measurably from the fp32 one (BENCHMARKS.md).

With a copy the adapter keeps running as its fp32 hook on top (y = W̃x + s·UΣRVᵀx), so nothing is
re-packed or re-quantized when v changes. Copies serve no-grad forwards only: with autograd on, a module
falls back to its plain fp32 forward.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn
from torch.nn import functional as F


def int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def packed_available() -> bool:
    """oneDNN's pre-packed linear works in this build (a private op: checked, never assumed)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), 1)
        return torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), w, None, "none", [], "").sum().item() == 6
    except (AttributeError, RuntimeError):
        return False


class GenerationWeights:
    """What a model generates with; `generating(adapter)` is the context to generate in."""

    label = ""  # for logs
    matches_training = True  # the numbers of the fp32 training forward (up to summation order)
    exact = False  # Merged: the weights are restored bit for bit after each block
    copies_weights = False  # a copy taken once: stale under a method that trains the base weights
    cpu_only = False

    @classmethod
    def make(cls, model: nn.Module, exact: bool = False) -> "GenerationWeights":
        """An instance for `model` (`exact`: a merge is undone bit for bit)."""
        return cls()

    def generating(self, adapter=None):
        return contextlib.nullcontext(self)

    def for_evaluation(self, model: nn.Module, exact: bool = False) -> "GenerationWeights":
        """The weights an evaluation of a training run reuses: these where they match training, else the
        exact choice for the model (merged on a CPU in fp32, `exact` if training goes on after; else hooks)."""
        if self.matches_training and not isinstance(self, Merged):
            return self
        weight = next(model.parameters())
        return Merged(exact) if weight.device.type == "cpu" and weight.dtype == torch.float32 else AdapterHooks()


class Merged(GenerationWeights):
    """The adapter folded into the weights while generating; `exact`: restored bit for bit after."""

    label = "merged"

    def __init__(self, exact: bool = False):
        self.exact = exact

    @classmethod
    def make(cls, model: nn.Module, exact: bool = False) -> "Merged":
        return cls(exact)

    def __str__(self) -> str:
        return "the adapter merged into the weights for each rollout"

    def generating(self, adapter=None):
        if adapter is None or not adapter.enabled:  # disabled: the base model, nothing to fold in
            return contextlib.nullcontext(self)
        return adapter.merged_weights(exact=self.exact)


class LinearCopies(GenerationWeights):
    """A per-nn.Linear copy of the weights, swapped in by `with copies.active(): ...`.

    Module objects stay the same (only their forward changes while active), so forward hooks, the
    adapter's included, keep firing.
    """

    bytes_per_weight = 4
    copies_weights = cpu_only = True

    @classmethod
    def make(cls, model: nn.Module, exact: bool = False) -> "LinearCopies":
        return cls(model)

    def __init__(self, model: nn.Module):
        self.model = model
        self.nbytes = linear_bytes(model, self.bytes_per_weight)  # approximate memory of the copy
        with torch.no_grad():
            self.copies = {name: self.convert(mod.weight.detach()) for name, mod in _cpu_linears(model)}

    def __str__(self) -> str:
        return f"{self.label} copy of the linear weights (+{self.nbytes / 1e9:.1f} GB), adapter as hooks"

    def generating(self, adapter=None):
        return self.active()

    def convert(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, copy: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def active(self):
        mods = {name: self.model.get_submodule(name) for name in self.copies}
        try:
            for name, mod in mods.items():
                mod.forward = self._forward(mod, self.copies[name])
            yield self
        finally:
            for mod in mods.values():
                mod.__dict__.pop("forward", None)

    def _forward(self, mod: nn.Linear, copy: torch.Tensor):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():  # these ops have no backward: the plain fp32 forward instead
                return F.linear(x, mod.weight, mod.bias)
            return self.linear(x, copy, mod.bias).to(mod.weight.dtype)
        return forward


class PackedWeights(LinearCopies):
    """fp32 weights pre-packed for oneDNN: exact fp32 arithmetic, no re-packing per call at decode shapes."""

    label = "packed fp32"

    def __init__(self, model: nn.Module, rows_hint: int = 32):
        if not packed_available():
            raise RuntimeError("this PyTorch build has no oneDNN packed linear; use --rollout-weights merged")
        self.rows_hint = rows_hint
        super().__init__(model)

    def convert(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype != torch.float32:
            raise ValueError(f"packed rollout weights are fp32; the model is {weight.dtype} (use 'hooks')")
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.rows_hint)

    def linear(self, x, copy, bias):
        return torch.ops.mkldnn._linear_pointwise(x.float(), copy, bias, "none", [], "")


class Int8Weights(LinearCopies):
    """int8 weights through fbgemm: ¼ of the fp32 memory, faster than fp32 rollouts on AVX2, approximate."""

    label, bytes_per_weight = "int8", 1
    matches_training = False

    def __init__(self, model: nn.Module):
        if not int8_available():
            raise RuntimeError("int8 rollouts need PyTorch's fbgemm engine (x86 CPU); use --rollout-weights merged")
        torch.backends.quantized.engine = "fbgemm"
        super().__init__(model)

    def convert(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_prepack(quantize_weight(weight), None)

    def linear(self, x, copy, bias):
        # fbgemm quantizes activations with one scale per call; a few tokens (the first of each
        # sequence) carry activations ~100× the rest and would flatten everyone else's. Scaling each
        # token to max |x| = 1 first makes that scale per token (the mean per-token log-prob gap to
        # fp32 on the default model fell from 0.90 to 0.086 nats).
        x = x.float()
        norm = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # [..., 1]
        # reduce_range: 7-bit activations, which fbgemm's AVX2 kernels need to avoid overflow
        y = torch.ops.quantized.linear_dynamic(x / norm, copy, True) * norm  # [..., out]
        return y if bias is None else y + bias


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8: [out, in] fp32 → quantized tensor (scale = max|row| / 127)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # [out]
    zero = torch.zeros_like(scale, dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated upstream; torch is pinned here
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, scale, zero, axis=0, dtype=torch.qint8)


def available_memory() -> int | None:
    """Bytes a new allocation can get without swapping (Linux MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _cpu_linears(model: nn.Module):
    """(name, module) of every nn.Linear on the CPU: what a copy replaces."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"]


def linear_bytes(model: nn.Module, bytes_per_weight: int = 4) -> int:
    """Bytes of a copy of every CPU nn.Linear weight (fp32 by default: what a packed copy costs)."""
    return sum(bytes_per_weight * m.weight.numel() for _, m in _cpu_linears(model))


class AdapterHooks(GenerationWeights):
    """No copy: the model's own weights, the adapter added by its hooks, as in training. The exact choice off
    the CPU and in bf16/fp16, where folding a small ΔW into the weights would round most of it away."""

    label = "hooks"

    def __str__(self) -> str:
        return "the model's own weights, adapter as hooks (no merge)"


# every way to generate, by the name --rollout-weights / --weights take: a new one is a class and a line here
KINDS: dict[str, type[GenerationWeights]] = {"packed": PackedWeights, "merged": Merged, "hooks": AdapterHooks,
                                             "int8": Int8Weights}
CHOICES = ("auto", *KINDS)


def for_generation(model: nn.Module, choice: str = "auto", *, trains_base: bool = False,
                   exact: bool = False) -> GenerationWeights:
    """The GenerationWeights `choice` asks for. `trains_base`: the method changes the base weights (full
    fine-tuning), so a copy taken once would go stale. `exact`: a merge is undone bit for bit.

    'auto' is packed fp32 where it applies (fp32 weights on a CPU with oneDNN) and the copy takes at
    most half of the memory available now (training still needs room for activations); elsewhere on a
    CPU with fp32 weights, merged; on a GPU or with bf16/fp16 weights, hooks (a merge would round ΔW away).
    """
    if choice not in CHOICES:
        raise ValueError(f"rollout_weights={choice!r}: expected one of {', '.join(CHOICES)}")
    weight = next(model.parameters())
    if choice == "auto":
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        fits = cpu_fp32 and not trains_base
        free = available_memory() if fits else None
        fits = fits and (free is None or linear_bytes(model) <= free / 2)
        choice = "packed" if fits and packed_available() else "merged" if cpu_fp32 or trains_base else "hooks"
    kind = KINDS[choice]
    if kind.copies_weights and trains_base:
        raise ValueError(f"rollout_weights={choice!r} copies the weights once, but full fine-tuning changes them: "
                         "use 'merged'")
    if kind.cpu_only and weight.device.type != "cpu":
        raise ValueError(f"rollout_weights={choice!r} is for CPU models; this one is on {weight.device}: use 'hooks'")
    return kind.make(model, exact=exact)
