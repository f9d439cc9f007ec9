"""The adapter: the shared machinery every method (tinylora.methods) runs on.

It finds the targets, asks the method for its tying plan and trainable tensors, computes the frozen SVD
factors where the method uses them, and adds the method's ΔW x to each target's output with a forward hook,
so module names (and `save_pretrained`, PEFT export, merging) stay those of the plain model; `detach()`
removes every trace. For the SVD methods (W' = W + s · U Σ R Vᵀ) it also holds the fast paths of that
product: fused for generation, per batch row for many adapters, in place for training.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from tinylora.adapter.plan import Target, group_index
from tinylora.adapter.svd import cached_svd, weight_digest
from tinylora.config import AdapterConfig
from tinylora.methods import method_of
from tinylora.methods.tinylora import mix


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
        self.method = method = method_of(config)
        self.model = [model]  # a list, so the base model is not registered as our submodule
        self.targets: list[Target] = method.targets(model, config)
        self.groups = method.groups(self.targets, config)
        self.group_of = group_index(self.groups, len(self.targets))
        self.merged = False
        self._originals: list[torch.Tensor] | None = None  # pristine weights, kept by merge(exact=True)
        self.enabled = True
        self._row_R: torch.Tensor | None = None  # [batch, n_modules, r, r] s·R per row, while rows differ
        self._row_index: torch.Tensor | None = None  # [k] the batch rows _row_R is for (None: all)
        self._fused: dict[int, torch.Tensor] = {}  # no-grad fast path, see _fused_in
        self._fused_v: torch.Tensor | None = None  # the v that _fused was built from
        self._casts: dict = {}  # frozen factors cast to the activations' dtype (see _factor)
        self._rs = {}  # (id(row_R), dtype) -> (row_R, (sR)ᵀΣ per module and row): see _row_RS
        self._rs_once: dict | None = None  # per_row(cached=False): the same, for one forward only
        self._hooks = []
        self.modules_by_index = [model.get_submodule(t.name) for t in self.targets]

        for p in model.parameters():
            p.requires_grad_(method.trains_base)

        self.digests = []  # of each target's exact bytes: the SVD cache key
        self.value_digests = []  # of each target rounded to bf16: the same in fp32 and bf16, not after any change
        norm_sq = 0.0  # of the untouched base weights, for the file's fingerprint
        self.factors = nn.ModuleList()
        show = sys.stderr.isatty() if progress is None else progress
        for t, mod in zip(tqdm(self.targets, desc=f"{'SVD' if method.uses_svd else 'hash'} of {len(self.targets)} "
                               "weights", disable=not show, unit="mat"), self.modules_by_index):
            digest = weight_digest(mod.weight)
            self.digests.append(digest)
            self.value_digests.append(weight_digest(mod.weight.detach().to(torch.bfloat16)))
            norm_sq += float(mod.weight.detach().double().pow(2).sum())
            tensors = method.frozen_factors(config, t)
            if method.uses_svd:
                U, S, V = cached_svd(mod.weight, config.r, config.svd, digest, use_cache)
                tensors = {"U": U, "S": S, "V": V, **tensors}
            self.factors.append(Factors(**tensors).to(mod.weight.device))

        self.base_norm = math.sqrt(norm_sq)
        for name, tensor in method.create_parameters(self).items():
            setattr(self, name, tensor)
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
        return mix(self.v[g], f.P, self.config.scale)

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
                if self._row_index is not None:  # only the rows with an adapter
                    x = x.index_select(0, self._row_index)  # [k, seq, in]
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
    def per_row(self, R: torch.Tensor, rows: torch.Tensor | None = None, cached: bool = True):
        """Within this block batch row b runs with R[b] ([batch, n_modules, r, r], s·R), not this adapter's v.
        `rows` (without autograd): R is [k, n_modules, r, r] for these k batch rows; the others run the base
        model and cost no adapter work. `cached=False`: R's values change in place between blocks (a CUDA
        graph's input buffer), so what is derived from R is derived again inside each block."""
        if rows is not None and torch.is_grad_enabled():
            raise ValueError("per_row(rows=...) is for generation: run it under torch.no_grad()")
        self._row_R, self._row_index = R, rows
        self._rs_once = None if cached else {}
        try:
            yield
        finally:
            self._row_R = self._row_index = self._rs_once = None

    def _row_RS(self, dtype: torch.dtype) -> torch.Tensor:
        """(sR)ᵀ·Σ of every module for every row, [n_modules, batch, r, r]: built once per set of rows, so a
        module's per-row work is one bmm."""
        R = self._row_R  # [batch, n_modules, r, r]
        key = (id(R), dtype)
        store = self._rs if self._rs_once is None else self._rs_once
        if key not in store:  # a few sets of rows alternate (the running batch, a prompt joining it)
            if len(store) >= 4:
                store.clear()
            S = torch.stack([f.S for f in self.factors]).to(R.device)  # [n_modules, r]
            RS = R.float().transpose(-1, -2) * S[None, :, None, :]  # [batch, M, k, j] = R[b, m, j, k] · S[m, j]
            store[key] = (R, RS.transpose(0, 1).to(dtype).contiguous())  # holds R: its id is not reused
        return store[key][1]

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

    def add_svd_delta(self, i: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """output + s·U Σ R Vᵀ x of module i, written into the module's fresh output.

        `output + U·h` allocates two new [..., out] tensors per module; at training shapes (10 MB each)
        glibc hands those out as fresh pages, and the page faults made training measurably slower than the
        frozen model. One in-place (b)addmm allocates nothing; autograd still checks it is safe."""
        h = self._down(i, x).to(output.dtype)  # [..., r]
        Ut = self._factor(i, "U", output.dtype).T  # [r, out]
        if self._row_index is not None:  # h holds the adapted rows only: [k, seq, r]
            mine = output.index_select(0, self._row_index)  # [k, seq, out]
            mine.view(-1, mine.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), Ut)  # rounded as with every row
            return output.index_copy_(0, self._row_index, mine)
        if not output.is_contiguous() or output.dim() != h.dim() or output.dim() not in (2, 3):
            return output + h @ Ut
        if output.dim() == 2:
            return output.addmm_(h, Ut)  # [n, out] += [n, r]·[r, out]
        if not torch.is_grad_enabled():  # one addmm over all rows; a view is fine without autograd
            output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), Ut)
            return output
        # with autograd: in place on the tensor itself (through a view autograd would copy it back)
        return output.baddbmm_(h, Ut.expand(h.shape[0], *Ut.shape))  # [b, s, out] += [b, s, r]·[r, out]

    def delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """ΔW x of module i without forming ΔW: x [..., in] → [..., out]."""
        return self.method.add_delta(self, i, x, x.new_zeros(*x.shape[:-1], self.targets[i].shape[0]))

    def delta_weight(self, i: int) -> torch.Tensor:
        """ΔW of module i in float32 [out, in] (for merging and export)."""
        return self.method.delta_weight(self, i)

    def _make_hook(self, i: int):
        def hook(module, args, output):
            if self.merged or not self.enabled:
                return output
            return self.method.add_delta(self, i, args[0], output)
        return hook

    # ---- state ------------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        return self.model[0]

    @property
    def device(self) -> torch.device:
        """Where the adapted weights live (and so the adapter's own tensors)."""
        return self.modules_by_index[0].weight.device if self.targets else torch.device("cpu")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.method.trainable_parameters(self)

    def num_trainable(self) -> int:
        total = sum(p.numel() for p in self.base_model.parameters())
        return self.method.count(self.targets, self.config, total)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that is trained, by stable names: what an adapter file holds."""
        return self.method.state(self)

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
        if self.merged or not self.targets:  # full, frozen: no ΔW outside the weights themselves
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


def attached(model: nn.Module) -> Adapter | None:
    """The adapter whose hooks are on `model` (attach, load_adapter, an AdapterBank), if any."""
    adapter = getattr(model, "_tinylora_adapter", None)
    return adapter if adapter is not None and adapter._hooks else None
