"""Reading, writing and attaching adapters, from a file or from one entry of a pack (`storage`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tinylora.adapter import Adapter, attach
from tinylora.config import AdapterConfig
from tinylora.storage.file import base_name, check_fingerprint, fingerprint, read_file, write_adapter_file
from tinylora.storage.pack import Pack, is_pack


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> Path:
    """Write the adapter atomically (a crash never leaves half a file under `path`)."""
    return write_adapter_file(path, adapter.config, base_name(adapter.base_model), fingerprint(adapter),
                              adapter.trainable_state())


def read_adapter_file(path: str | os.PathLike, name: str | None = None) -> tuple[AdapterConfig, dict,
                                                                                dict[str, torch.Tensor]]:
    """Parse and validate a file without a model: (config, metadata, tensors). A pack (see `pack`) needs the
    `name` of one of its adapters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if is_pack(path):
        if name is None:
            raise ValueError(f"{path} is an adapter pack: name the adapter to load (name=..., or PACK::NAME)")
        with Pack(path) as pack:
            return pack.config, {"fingerprint": pack.fingerprint, "base": pack.base}, {"v": pack.get(name)}
    if name is not None:
        raise ValueError(f"{path} is a single adapter file, not a pack: it has no adapter {name!r}")
    return read_file(path)


def split_pack_path(path: str | os.PathLike, name: str | None = None) -> tuple[Path, str | None]:
    """"users.tlpack::alice" -> (users.tlpack, "alice"): how a command line names one adapter of a pack."""
    text = str(path)
    if name is None and "::" in text and not Path(text).is_file():
        text, name = text.rsplit("::", 1)
    return Path(text), name


def load_adapter(model: torch.nn.Module, path: str | os.PathLike, *, name: str | None = None, strict: bool = True,
                 **kwargs) -> Adapter:
    """Attach the adapter stored in `path` to `model` (its base) and load its trained tensors; from a pack,
    the adapter `name` (or pass "PACK::NAME" as `path`)."""
    path, name = split_pack_path(path, name)
    config, meta, tensors = read_adapter_file(path, name)
    adapter = attach(model, config, **kwargs)
    check_fingerprint(meta["fingerprint"], fingerprint(adapter), f"{path}::{name}" if name else str(path), strict)
    adapter.load_trainable_state(tensors)
    return adapter
