"""The adapter: frozen factors per target, tied trainable v, and forward hooks on the base model.

    W' = W + s · U Σ R Vᵀ,   R = Σ_i v_i P_i            (tinylora: P [u, r, r] ~ N(0, 1), s = 1/√u)
    lora-xs is the same code with P = the standard basis of r×r matrices (v is R itself), s = 1.
    lora: W' = W + s · B A (A [r, in] Kaiming-uniform, B [out, r] zero), s = alpha / r.

Hooks add the low-rank term to each target's output, so module names (and `save_pretrained`,
PEFT export, merging) stay those of the plain model; `detach()` removes every trace.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from tinylora.adapter.plan import Target, find_targets, tie_groups, trainable_count
from tinylora.adapter.svd import cached_svd, weight_digest
from tinylora.config import AdapterConfig
from tinylora.models import DTYPES


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, module name): P is regenerated, never stored."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projections(config: AdapterConfig, name: str) -> torch.Tensor:
    """The fixed P [k, r, r] of one module (k = u for tinylora, r² for lora-xs)."""
    r = config.r
    if config.method == "lora-xs":
        return torch.eye(r * r).view(r * r, r, r)
    g = torch.Generator().manual_seed(module_seed(config.seed, name))
    return torch.randn(config.u, r, r, generator=g, dtype=torch.float32)


class Factors(nn.Module):
    """Frozen per-module tensors. Buffers, so `.to(device)` moves them and autograd skips them."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for k, t in tensors.items():
            self.register_buffer(k, t, persistent=False)


class Adapter(nn.Module):
    def __init__(self, model: nn.Module, config: AdapterConfig, *, progress: bool | None = None,
                 use_cache: bool = True):
        super().__init__()
        other = getattr(model, "_tinylora_adapter", None)
        if other is not None and other._hooks:
            raise ValueError("this model already has a tinylora adapter attached (two would add up silently): "
                             "call adapter.detach() first, or serve several adapters with AdapterBank")
        self.config = config
        self.model = [model]  # a list, so the base model is not registered as our submodule
        self.targets: list[Target] = [] if config.method in ("full", "frozen") else find_targets(model, config.targets)
        self.groups = tie_groups(self.targets, config)
        self.group_of = [0] * len(self.targets)
        for g, members in enumerate(self.groups):
            for i in members:
                self.group_of[i] = g
        self.merged = False
        self._originals: list[torch.Tensor] | None = None  # pristine weights, kept by merge(exact=True)
        self.enabled = True
        self._row_R: torch.Tensor | None = None  # [batch, n_modules, r, r] s·R per row, while rows differ
        self._fused: dict[int, torch.Tensor] = {}  # no-grad fast path, see _fused_in
        self._fused_v: torch.Tensor | None = None  # the v that _fused was built from
        self._casts: dict = {}  # frozen factors cast to the activations' dtype (see _factor)
        self._rs = None  # (row_R, dtype, (sR)ᵀΣ per module and row): see _row_RS
        self._hooks = []
        self.modules_by_index = [model.get_submodule(t.name) for t in self.targets]
        device = self.modules_by_index[0].weight.device if self.targets else torch.device("cpu")

        for p in model.parameters():
            p.requires_grad_(config.method == "full")

        self.digests = []  # of each target's exact bytes: the SVD cache key
        self.value_digests = []  # of each target rounded to bf16: the same in fp32 and bf16, not after any change
        norm_sq = 0.0  # of the untouched base weights, for the file's fingerprint
        self.factors = nn.ModuleList()
        show = sys.stderr.isatty() if progress is None else progress
        svd_methods = self.svd_method = config.method in ("tinylora", "lora-xs")
        for t, mod in zip(tqdm(self.targets, desc=f"{'SVD' if svd_methods else 'hash'} of {len(self.targets)} "
                               "weights", disable=not show, unit="mat"), self.modules_by_index):
            digest = weight_digest(mod.weight)
            self.digests.append(digest)
            self.value_digests.append(weight_digest(mod.weight.detach().to(torch.bfloat16)))
            norm_sq += float(mod.weight.detach().double().pow(2).sum())
            if svd_methods:
                U, S, V = cached_svd(mod.weight, config.r, config.svd, digest, use_cache)
                self.factors.append(Factors(U=U, S=S, V=V, P=projections(config, t.name)).to(device))
            elif config.method == "lora":
                self.factors.append(Factors())

        self.base_norm = math.sqrt(norm_sq)
        if svd_methods:
            v_dtype = DTYPES[config.v_dtype]
            # one tensor for all groups: a single optimizer entry and a single tensor in the file
            self.v = nn.Parameter(torch.zeros(len(self.groups), config.numbers_per_group, dtype=v_dtype,
                                              device=device))  # [n_groups, k]
        elif config.method == "lora":
            self.lora_A = nn.ParameterList()
            self.lora_B = nn.ParameterList()
            for t in self.targets:
                out_f, in_f = t.shape
                A = torch.empty(config.r, in_f)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5),
                                         generator=torch.Generator().manual_seed(module_seed(config.seed, t.name)))
                self.lora_A.append(nn.Parameter(A.to(device)))
                self.lora_B.append(nn.Parameter(torch.zeros(out_f, config.r, device=device)))
        for i, mod in enumerate(self.modules_by_index):
            self._hooks.append(mod.register_forward_hook(self._make_hook(i)))
        if self.targets:  # object.__setattr__: not registered as a submodule (no v in model.parameters())
            object.__setattr__(model, "_tinylora_adapter", self)

    # ---- the math ---------------------------------------------------------------------------
    def R(self, i: int) -> torch.Tensor:
        """s·R of module i: [r, r], or [batch, r, r] when rows use different adapters."""
        f, g = self.factors[i], self.group_of[i]
        if self._row_R is not None:
            return self._row_R[:, i]  # [batch, r, r]
        return self.config.scale * torch.einsum("k,kij->ij", self.v[g].float(), f.P)

    def delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for module i without forming ΔW; x [..., in] → [..., out]."""
        if self.config.method == "lora":
            A, B = self.lora_A[i], self.lora_B[i]
            return self.config.scale * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T)
        return self._down(i, x) @ self._factor(i, "U", x.dtype).T  # [..., out]

    def _factor(self, i: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A frozen factor (U, S, V) of module i in the activations' dtype, cast once: on a GPU every cast is
        a kernel launch, per module and decode step."""
        t = getattr(self.factors[i], name)
        if t.dtype == dtype:
            return t
        key = (i, name, dtype, t.device)
        if key not in self._casts:
            self._casts[key] = t.to(dtype)
        return self._casts[key]

    def _down(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Σ (sR) Vᵀ x of module i: x [..., in] → [..., r], the input side of ΔW x = U · this."""
        if not torch.is_grad_enabled():
            if self._row_R is None:  # generation: V·(sR)ᵀ·Σ fused once per v
                return F.linear(x, self._fused_in(i, x.dtype))  # [..., r]
            if x.dim() == 3:  # per-row adapters: x is [batch, seq, in]
                RS = self._row_RS(x.dtype)[i]  # [batch, r, r]
                if RS.shape[0] != x.shape[0]:  # HF generate() may expand rows (num_return_sequences)
                    RS = RS.repeat_interleave(x.shape[0] // RS.shape[0], dim=0)
                return torch.bmm(x @ self._factor(i, "V", x.dtype), RS)  # [batch, seq, r]
        h = x @ self._factor(i, "V", x.dtype)  # [..., r]
        R = self.R(i).to(x.dtype)
        if R.dim() == 2:
            h = h @ R.T  # [..., r]
        else:  # per-row adapters: x is [batch, seq, in]
            if R.shape[0] != h.shape[0]:
                R = R.repeat_interleave(h.shape[0] // R.shape[0], dim=0)
            h = torch.einsum("bsk,bjk->bsj", h, R)  # [batch, seq, r]
        return h * self._factor(i, "S", x.dtype)  # [..., r]

    @contextlib.contextmanager
    def per_row(self, R: torch.Tensor):
        """Within this block batch row b runs with R[b] ([batch, n_modules, r, r], s·R), not this adapter's v."""
        self._row_R = R
        try:
            yield
        finally:
            self._row_R = None

    def _row_RS(self, dtype: torch.dtype) -> torch.Tensor:
        """(sR)ᵀ·Σ of every module for every row, [n_modules, batch, r, r]: built once per set of rows, so a
        module's per-row work is one bmm."""
        R = self._row_R  # [batch, n_modules, r, r]
        if self._rs is None or self._rs[0] is not R or self._rs[1] != dtype:
            S = torch.stack([f.S for f in self.factors]).to(R.device)  # [n_modules, r]
            RS = R.float().transpose(-1, -2) * S[None, :, None, :]  # [batch, M, k, j] = R[b, m, j, k] · S[m, j]
            self._rs = (R, dtype, RS.transpose(0, 1).to(dtype).contiguous())
        return self._rs[2]

    def _fused_in(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(V (sR)ᵀ Σ)ᵀ of module i [r, in] in `dtype`, cached while v keeps the values it was built from.

        Stored as r contiguous rows: x·Wᵀ with W [r, in] (F.linear) is faster than x·M with M [in, r]
        at decode shapes."""
        if self._fused_v is None or not torch.equal(self._fused_v, self.v):  # v is tiny: comparing is cheap
            self._fused, self._fused_v = {}, self.v.detach().clone()
        if i not in self._fused:
            f = self.factors[i]
            self._fused[i] = ((f.V @ self.R(i).T) * f.S).T.contiguous()  # [r, in]
        if dtype == self._fused[i].dtype:
            return self._fused[i]
        if (i, dtype) not in self._fused:
            self._fused[(i, dtype)] = self._fused[i].to(dtype)
        return self._fused[(i, dtype)]

    def _add_delta(self, i: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """output + ΔW x, written into the module's fresh output.

        `output + U·h` allocates two new [..., out] tensors per module; at training shapes (10 MB each)
        glibc hands those out as fresh pages, and the page faults made training measurably slower than the
        frozen model. One in-place (b)addmm allocates nothing; autograd still checks it is safe."""
        h = self._down(i, x).to(output.dtype)  # [..., r]
        Ut = self._factor(i, "U", output.dtype).T  # [r, out]
        if not output.is_contiguous() or output.dim() != h.dim() or output.dim() not in (2, 3):
            return output + h @ Ut
        if output.dim() == 2:
            return output.addmm_(h, Ut)  # [n, out] += [n, r]·[r, out]
        if not torch.is_grad_enabled():  # one addmm over all rows; a view is fine without autograd
            output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), Ut)
            return output
        # with autograd: in place on the tensor itself (through a view autograd would copy it back)
        return output.baddbmm_(h, Ut.expand(h.shape[0], *Ut.shape))  # [b, s, out] += [b, s, r]·[r, out]

    def delta_weight(self, i: int) -> torch.Tensor:
        """ΔW of module i in float32 [out, in] (for merging and export)."""
        if self.config.method == "lora":
            return self.config.scale * (self.lora_B[i].float() @ self.lora_A[i].float())
        f = self.factors[i]
        return (f.U * f.S) @ self.R(i) @ f.V.T

    def _make_hook(self, i: int):
        def hook(module, args, output):
            if self.merged or not self.enabled:
                return output
            if self.svd_method:
                return self._add_delta(i, args[0], output)
            return output + self.delta_output(i, args[0])
        return hook

    # ---- state ------------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        return self.model[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.config.method == "full":
            return [p for p in self.base_model.parameters()]
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        total = sum(p.numel() for p in self.base_model.parameters())
        return trainable_count(self.targets, self.config, total)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that is trained, by stable names: what an adapter file holds."""
        m = self.config.method
        if m in ("tinylora", "lora-xs"):
            return {"v": self.v.detach()}
        if m == "lora":
            state = {}
            for t, A, B in zip(self.targets, self.lora_A, self.lora_B):
                state[f"{t.name}.lora_A"] = A.detach()
                state[f"{t.name}.lora_B"] = B.detach()
            return state
        if m == "full":
            return {k: v.detach() for k, v in self.base_model.state_dict().items()}
        return {}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"adapter tensors do not fit this adapter: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for k, t in state.items():
            if t.shape != own[k].shape:
                raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
            own[k].copy_(t.to(own[k].dtype))

    # ---- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, exact: bool = False) -> None:
        """Fold ΔW into the base weights in place (fast generation); the hooks go quiet.

        exact=True keeps one copy of the targeted weights (taken on first use) so that unmerge()
        restores them bit for bit: a training loop that merges for every rollout must not let
        rounding drift accumulate in the base. Without it, unmerge() subtracts ΔW again.
        """
        if self.merged or self.config.method in ("full", "frozen"):
            self.merged = self.config.method not in ("full", "frozen")
            return
        if exact and self._originals is None:
            self._originals = [m.weight.detach().clone() for m in self.modules_by_index]
        elif not exact:
            self._originals = None
        for i, mod in enumerate(self.modules_by_index):
            W = mod.weight
            W.copy_((W.float() + self.delta_weight(i).to(W.device)).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): bit-exact after merge(exact=True), else up to one rounding of the weight dtype."""
        if not self.merged:
            return
        for i, mod in enumerate(self.modules_by_index):
            W = mod.weight
            if self._originals is not None:
                W.copy_(self._originals[i])
            else:
                W.copy_((W.float() - self.delta_weight(i).to(W.device)).to(W.dtype))
        self.merged = False

    @contextlib.contextmanager
    def merged_weights(self, exact: bool = False):
        self.merge(exact)
        try:
            yield self
        finally:
            self.unmerge()

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model (v = 0) without touching v: the reference policy for a KL term."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def detach(self) -> nn.Module:
        """Unmerge, remove the hooks and give back the plain base model."""
        self.unmerge()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.base_model, "_tinylora_adapter", None) is self:
            del self.base_model._tinylora_adapter
        return self.base_model


def attach(model: nn.Module, config: AdapterConfig | None = None, **kwargs) -> Adapter:
    """Make `model` a TinyLoRA model: the returned Adapter owns the only trainable tensors."""
    return Adapter(model, config or AdapterConfig(), **kwargs)
