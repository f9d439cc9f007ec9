"""Many adapters over one base model, in one batch.

Every tinylora and lora-xs adapter of one base shares the frozen factors U, Σ, V (same rank r, same
targets); what differs is each module's r×r matrix s·R = s·Σ_i v_i P_i. A batch row only needs its own stack
R [n_modules, r, r], built from the adapter's v and its config's P when the row asks for it: the extra cost
per row does not depend on how many distinct adapters the batch holds, and adapters with different u, n_tie,
tying or seed still share a batch. The bank holds each adapter as its v alone (adapters of one config are rows
of one tensor, `VRows`), and the last `R_CACHE` stacks it built.

    bank = AdapterBank(model, ["alice.safetensors", "bob.safetensors"])
    with bank.rows(["bob", "alice", None]):   # None: the base model
        model.generate(...)                    # (or the Engine, which tracks rows as they come and go)

Over a pack (`pack=Pack(...)`) the bank holds no adapter of it in memory: a row's v is read from the pack (a
few dozen bytes) when the row joins. A million adapters then cost the pack's page cache, not a million stacks.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from tinylora.adapter.model import Adapter, attach
from tinylora.adapter.plan import group_index
from tinylora.config import AdapterConfig
from tinylora.io import read_adapter_file
from tinylora.methods import SINGLE_V
from tinylora.methods.tinylora import mix
from tinylora.storage.file import check_fingerprint, fingerprint

SERVABLE = SINGLE_V  # one v over the shared U, Σ, V
SHARED_FIELDS = ("r", "targets", "svd")  # what fixes U, Σ, V: adapters in one bank agree on these
MAX_ABS_V = 1e4  # trained v stay far below; larger ones only overflow
R_CACHE = 4096  # R stacks kept after use (~2.7 KB each on the default model): the adapters in recent rows


class VRows:
    """Adapters of one config as rows of one tensor v [capacity, n_groups, k] (their values in float32) and a
    name → row map: per adapter its v and a dict entry, no tensor object of its own."""

    def __init__(self, config: AdapterConfig, shape: tuple[int, ...]):
        self.config, self.index, self.free = config, {}, []  # name -> row; rows freed by removals
        self.v = torch.zeros(0, *shape)

    def put(self, name: str, v: torch.Tensor) -> None:
        row = self.index.get(name)
        if row is None:
            row = self.free.pop() if self.free else len(self.index)
            if row >= len(self.v):  # grow by doubling: amortised O(1) per adapter
                self.v = torch.cat([self.v, torch.zeros(max(len(self.v), 16), *self.v.shape[1:])])
            self.index[name] = row
        self.v[row] = v

    def get(self, name: str) -> torch.Tensor | None:
        row = self.index.get(name)
        return None if row is None else self.v[row]

    def remove(self, name: str) -> bool:
        row = self.index.pop(name, None)
        if row is not None:
            self.free.append(row)
        return row is not None


class AdapterBank:
    def __init__(self, model: nn.Module, paths: list[str | os.PathLike] = (), *, config: AdapterConfig | None = None,
                 strict: bool = True, max_file_bytes: int | None = None, pack=None, **kwargs):
        """Attach the shared factors (from `config`, else the pack's, else the first file's config, else the
        default) and load `paths`, each under its file name without `.safetensors`; serve `pack`'s adapters."""
        if config is None:
            config = pack.config if pack is not None else read_adapter_file(paths[0])[0] if paths else AdapterConfig()
        if config.method not in SERVABLE:
            where = f"{paths[0]}: " if paths else ""
            raise ValueError(f"{where}a bank serves {'/'.join(SERVABLE)} adapters, not {config.method!r} "
                             "(export it as LoRA and serve that with PEFT or vLLM)")
        self.config = config
        self.adapter: Adapter = attach(model, config, **kwargs)  # its own v stays 0: rows bring their R
        self.fingerprint = fingerprint(self.adapter)
        self.strict, self.max_file_bytes = strict, max_file_bytes
        self._targets = [t.name for t in self.adapter.targets]
        self.held: dict[str, VRows] = {}  # config JSON -> the adapters of that config held in memory
        self.lock = threading.Lock()  # loads and unloads (server threads) against listing and lookups
        self.pack, self._cached = pack, OrderedDict()  # name -> R stack, most recently used last
        self._changes = 0  # adds and removes so far: a stack built across one is not cached
        self._pack_version = pack.data_version() if pack is not None else None
        if pack is not None:
            check_fingerprint(pack.fingerprint, self.fingerprint, str(pack.path), strict)
            self._check_shared(pack.config, str(pack.path))
        for p in paths:
            self.load(p)

    def __len__(self) -> int:
        with self.lock:
            held = sum(len(h.index) for h in self.held.values())
        return held + (len(self.pack) if self.pack is not None else 0)

    def __contains__(self, name: str) -> bool:
        return self._held_v(name) is not None or (self.pack is not None and name in self.pack)

    @property
    def names(self) -> list[str]:
        """The adapters held in memory (files, runtime loads), sorted; a pack's are listed by `page`."""
        with self.lock:
            return sorted(name for h in self.held.values() for name in h.index)

    def _held_v(self, name: str) -> tuple[AdapterConfig, torch.Tensor] | None:
        with self.lock:
            for h in self.held.values():
                v = h.get(name)
                if v is not None:
                    return h.config, v.clone()  # a replace may rewrite the row while a stack is built
        return None

    @property
    def nbytes(self) -> int:
        """Memory the bank holds for its adapters: every held v (with the rows grown ahead) and the cached stacks."""
        with self.lock:
            held = sum(h.v.numel() * h.v.element_size() for h in self.held.values())
            return held + sum(R.numel() * R.element_size() for R in self._cached.values())

    def page(self, after: str = "", limit: int = 1000) -> list[str]:
        """Names in memory, then up to `limit` of the pack's in sorted order after `after`."""
        mine = self.names if not after else []
        return mine + (self.pack.names(after=after, limit=limit) if self.pack is not None else [])

    def get(self, name: str) -> torch.Tensor | None:
        """The R stack of adapter `name`, or None; a damaged pack entry raises ValueError naming it."""
        version = self.pack.data_version() if self.pack is not None else None
        with self.lock:
            if version != self._pack_version:  # another process wrote the pack: no stack built before is trusted
                self._pack_version, self._changes = version, self._changes + 1
                self._cached.clear()
            R = self._cached.get(name)
            if R is not None:
                self._cached.move_to_end(name)
                return R
            changes = self._changes
        held = self._held_v(name)
        if held is not None:
            R = self._stack(*held)
        elif self.pack is None:
            return None
        else:
            try:
                v = self.pack.get(name)
            except KeyError:
                return None
            R = self.R_of(self.pack.config, v, source=f"{self.pack.path}::{name}")
        with self.lock:
            if changes != self._changes:  # replaced or removed meanwhile: serve this row, keep nothing
                return R
            self._cached[name] = R
            while len(self._cached) > R_CACHE:
                self._cached.popitem(last=False)
        return R

    def _fits_pack(self, config: AdapterConfig, fp: dict | None) -> bool:
        return self.pack is not None and config.to_json() == self.pack.config.to_json() \
            and (fp is None or fp == self.pack.fingerprint)

    def _forget(self, name: str) -> None:
        with self.lock:
            self._changes += 1
            self._cached.pop(name, None)

    @property
    def device(self) -> torch.device:
        return self.adapter.factors[0].U.device

    # ---- adding and removing ------------------------------------------------------------------
    def load(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Validate a file (format, size, checksum, finite values, base fingerprint, shared factors) and
        add it under `name` (default: the file name without .safetensors). Returns the name."""
        path = Path(path)
        if self.max_file_bytes is not None and path.is_file() and path.stat().st_size > self.max_file_bytes:
            raise ValueError(f"{path}: {path.stat().st_size} bytes is over the limit of {self.max_file_bytes}")
        config, meta, tensors = read_adapter_file(path)
        check_fingerprint(meta["fingerprint"], self.fingerprint, str(path), self.strict)
        name = name or path.name.removesuffix(".safetensors")
        self.add(name, config, tensors.get("v"), source=str(path), fingerprint=meta["fingerprint"])
        return name

    def add(self, name: str, config: AdapterConfig, v, *, source: str = "adapter",
            fingerprint: dict | None = None) -> torch.Tensor:
        """Add (or replace) an adapter. With a pack, one that fits its config (and base) is written into the
        pack, committed before this returns; others are held in memory."""
        R = self.R_of(config, v, source=source)
        if self._fits_pack(config, fingerprint):
            self.pack.put({name: torch.as_tensor(v, dtype=torch.float32).to(self.pack.dtype)})
            with self.lock:
                for h in self.held.values():
                    h.remove(name)
        else:
            v = _as_stored(config, torch.as_tensor(v, dtype=torch.float32))
            with self.lock:
                for key, h in self.held.items():  # one name, one adapter: drop one of another config
                    if key != config.to_json():
                        h.remove(name)
                self.held.setdefault(config.to_json(), VRows(config, tuple(v.shape))).put(name, v)
        self._forget(name)
        return R

    def remove(self, name: str) -> None:
        """Remove an adapter (from the pack too, durably, if it lives there)."""
        with self.lock:
            removed = any([h.remove(name) for h in self.held.values()])
        if removed:
            self._forget(name)
            return
        if self.pack is None or name not in self.pack:
            raise KeyError(name)
        self.pack.remove([name])
        self._forget(name)

    def R_of(self, config: AdapterConfig, v, *, source: str = "adapter") -> torch.Tensor:
        """The stack s·R [n_modules, r, r] of an adapter given by its config and v [n_groups, k] (a tensor or
        nested lists), after checking that it fits this bank; without adding it (inline adapters)."""
        self._check_shared(config, source)
        if v is None:
            raise ValueError(f"{source}: holds no 'v' tensor")
        try:
            v = torch.as_tensor(v, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{source}: v is not an array of numbers: {e}") from e
        n_groups = len(config.method_object.groups(self.adapter.targets, config))  # before P: u sets its size
        if tuple(v.shape) != (n_groups, config.numbers_per_group):
            raise ValueError(f"{source}: v has shape {list(v.shape)}, expected [{n_groups}, "
                             f"{config.numbers_per_group}] for this config on this model")
        if not torch.isfinite(v).all():
            raise ValueError(f"{source}: v holds NaN or inf values")
        if v.abs().max() > MAX_ABS_V:
            raise ValueError(f"{source}: |v| reaches {v.abs().max():.3g}; values beyond {MAX_ABS_V:g} are refused "
                             "(they would overflow the activations)")
        return self._stack(config, _as_stored(config, v))

    def _stack(self, config: AdapterConfig, v: torch.Tensor) -> torch.Tensor:
        """s·R [n_modules, r, r] on the model's device from a checked v [n_groups, k]."""
        P, group_of, _ = _projections(config.to_json(), tuple(self.adapter.targets))
        return mix(v[group_of], P, config.scale).to(self.device)  # [n_modules, r, r]

    def _check_shared(self, config: AdapterConfig, source: str) -> None:
        if config.method not in SERVABLE:
            raise ValueError(f"{source}: method {config.method!r} cannot be served (only {'/'.join(SERVABLE)})")
        for f in SHARED_FIELDS:
            if getattr(config, f) != getattr(self.config, f):
                raise ValueError(f"{source}: {f}={getattr(config, f)!r} differs from this bank's "
                                 f"{getattr(self.config, f)!r} (adapters in one bank share U, Σ, V)")

    def v_shape(self, config: AdapterConfig) -> tuple[int, int]:
        """[n_groups, k] of an adapter of `config` over this bank's targets (checked to fit the bank)."""
        self._check_shared(config, "adapter")
        return len(config.method_object.groups(self.adapter.targets, config)), config.numbers_per_group

    def stack_of(self, v: torch.Tensor, config: AdapterConfig | None = None) -> torch.Tensor:
        """s·R [n_modules, r, r] of v [n_groups, k] under `config` (default: the bank's), differentiable in v:
        how adapters trained together in one batch (training.batched) enter their rows."""
        config = config or self.config
        P, group_of, _ = _projections(config.to_json(), tuple(self.adapter.targets))
        return mix(v.float()[group_of.to(v.device)], P.to(v.device), config.scale)  # [n_modules, r, r]

    # ---- rows ---------------------------------------------------------------------------------
    def stack(self, which) -> torch.Tensor:
        """[batch, n_modules, r, r] for a list of names (or indices into `names`; None: the base)."""
        names = self.names
        out = []
        for w in which:
            if w is None:
                out.append(self.zeros())
            elif isinstance(w, str):
                R = self.get(w)
                if R is None:
                    raise KeyError(f"no adapter named {w!r} in this bank")
                out.append(R)
            else:
                if not 0 <= int(w) < len(names):
                    raise IndexError(f"adapter ids must lie in [0, {len(names)}), got {w}")
                out.append(self.get(names[int(w)]))
        return torch.stack(out) if out else self.zeros()[None][:0]

    def zeros(self) -> torch.Tensor:
        """The base model's R (nothing added)."""
        r = self.config.r
        return torch.zeros(len(self._targets), r, r, device=self.device)

    def rows(self, which):
        """Within this block every forward (HF `generate` included) runs row b with adapter which[b]."""
        return self.adapter.per_row(self.stack(which))


def _as_stored(config: AdapterConfig, v: torch.Tensor) -> torch.Tensor:
    """v rounded to the config's v dtype, in float32: the values the adapter itself would hold."""
    dtype = torch.bfloat16 if config.v_dtype == "bf16" else torch.float16 if config.v_dtype == "fp16" else torch.float32
    return v.to(dtype).float()


@functools.lru_cache(maxsize=16)
def _projections(config_json: str, targets: tuple):
    """P of every module [n_modules, k, r, r], each module's tie group [n_modules], and the group count:
    the same for every adapter of one config, so computed once."""
    config = AdapterConfig.from_json(config_json)
    method = config.method_object
    groups = method.groups(list(targets), config)
    group_of = torch.tensor(group_index(groups, len(targets)), dtype=torch.long)
    P = torch.stack([method.projections(config, t.name) for t in targets])  # [n_modules, k, r, r]
    return P, group_of, len(groups)
