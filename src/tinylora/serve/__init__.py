"""`tinylora serve`: an OpenAI-compatible server for one base model and many adapters (see app.py)."""

from __future__ import annotations

from pathlib import Path

from .limits import Limits

__all__ = ["Limits", "build_server"]


def build_server(model, tokenizer, *, name: str, adapters: str | Path | None = None, config=None,
                 limits: Limits | None = None, strict: bool = True, weights: str = "auto", **kwargs):
    """A Server over `model`: every *.safetensors adapter in the folder `adapters` is validated and loaded,
    under its file name without .safetensors."""
    from ..bank import AdapterBank
    from .app import Server
    limits = limits or Limits()
    paths = []
    if adapters is not None:
        folder = Path(adapters)
        if not folder.is_dir():
            raise ValueError(f"--adapters {folder}: not a folder")
        paths = sorted(folder.glob("*.safetensors"))
        if name in {p.name.removesuffix(".safetensors") for p in paths}:
            raise ValueError(f"{folder}: an adapter is named like the base model ({name!r})")
    bank = AdapterBank(model, paths, config=config, strict=strict, max_file_bytes=limits.max_adapter_bytes,
                       progress=False)
    return Server(model, tokenizer, bank, name=name, limits=limits, weights=weights, **kwargs)
