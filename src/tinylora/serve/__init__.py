"""`tinylora serve`: an OpenAI-compatible server for one base model and many adapters (see app.py)."""

from __future__ import annotations

from pathlib import Path

from tinylora.serve.limits import Limits

__all__ = ["Limits", "build_server"]


def build_server(model, tokenizer, *, name: str, adapters=None, config=None,
                 limits: Limits | None = None, strict: bool = True, weights: str = "auto", **kwargs):
    """A Server over `model`. `adapters`: a folder, a pack file, or a list of them (at most one pack): every
    *.safetensors adapter in a folder is validated and loaded under its file name without .safetensors; a
    pack's adapters are read from it as requests name them (nothing is loaded ahead)."""
    from tinylora.generation.bank import AdapterBank
    from tinylora.serve.app import Server
    from tinylora.storage.pack import Pack, is_pack
    limits = limits or Limits()
    sources = [] if adapters is None else [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    paths, packs = [], []
    for source in map(Path, sources):
        if source.is_file() and is_pack(source):
            packs.append(Pack(source))
        elif source.is_dir():
            paths += sorted(source.glob("*.safetensors"))
        else:
            raise ValueError(f"--adapters {source}: not a folder of adapters or an adapter pack")
    if len(packs) > 1:
        raise ValueError(f"--adapters: one pack per server ({', '.join(str(p.path) for p in packs)} given)")
    pack = packs[0] if packs else None
    if name in {p.name.removesuffix(".safetensors") for p in paths} or (pack is not None and name in pack):
        raise ValueError(f"--adapters: an adapter is named like the base model ({name!r})")
    bank = AdapterBank(model, paths, config=config, strict=strict, max_file_bytes=limits.max_adapter_bytes,
                       pack=pack, progress=False)
    return Server(model, tokenizer, bank, name=name, limits=limits, weights=weights, **kwargs)
