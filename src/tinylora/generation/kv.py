"""The key/value cache: prompts prefilled once for several rows, and the forward argument that takes a cache."""

from __future__ import annotations

import functools
import inspect

import torch
from torch.nn import functional as F


@functools.cache
def _cache_arg(model_class: type) -> str:
    """The forward() argument that takes a KV cache: `cache` in newer transformers, `past_key_values` in older."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    return {_cache_arg(type(model)): cache, "use_cache": True}


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, repeats: int = 1):
    """Run left-padded prompts [b, P] once and repeat the result for `repeats` rows each.

    Returns the last position's logits [b·repeats, 1, V], the key/value cache, and the attention mask
    and position ids [b·repeats, P] (positions follow the mask, as in generate()). Under autograd the
    cache keeps its graph, so gradients from every repeat flow back through the one prompt pass.
    """
    from transformers import DynamicCache
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [b, P]
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(model, cache),
                   logits_to_keep=1).logits  # [b, 1, V]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask, pos = (x.repeat_interleave(repeats, dim=0) for x in (logits, mask, pos))  # [b·repeats, ...]
    return logits, cache, mask, pos


def cache_layers(cache) -> list:
    """The per-layer key/value tensors of a DynamicCache (full attention only: continuous batching edits them)."""
    layers = cache.layers
    kinds = {type(layer).__name__ for layer in layers}
    if kinds != {"DynamicLayer"}:
        raise NotImplementedError(f"continuous batching needs full-attention KV caches, this model has {kinds}")
    return layers


def pad_left(cache, n: int) -> None:
    for layer in cache_layers(cache):
        layer.keys = F.pad(layer.keys, (0, 0, n, 0))  # [b, heads, n + L, d]
        layer.values = F.pad(layer.values, (0, 0, n, 0))
