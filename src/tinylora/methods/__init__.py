"""Adaptation methods, one object each (TinyLoRA, LoRA-XS, LoRA, full, frozen). Adding one is one file and
one line in METHODS."""

from __future__ import annotations

from .base import Method
from .full import Frozen, Full
from .lora import LoRA
from .lora_xs import LoRAXS
from .tinylora import TinyLoRA

METHODS: dict[str, Method] = {m.name: m for m in (TinyLoRA(), LoRAXS(), LoRA(), Full(), Frozen())}
SINGLE_V = tuple(name for name, m in METHODS.items() if m.single_v)  # one v each: banks, packs, serving


def method_of(config) -> Method:
    """The Method of an AdapterConfig (or of a method name)."""
    name = config if isinstance(config, str) else config.method
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "SINGLE_V", "Method", "method_of"]
