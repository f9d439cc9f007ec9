"""Tiny random models of each supported architecture, built from a config: no download, seconds to build.

Used by the test suite and the benchmarks; handy for trying the API without a checkpoint.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

ARCHS = ("llama", "qwen2", "qwen3", "gemma3_text")

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config(arch: str = "qwen2", **overrides):
    from transformers import AutoConfig
    extra = {"head_dim": 8} if arch in ("qwen3", "gemma3_text") else {}
    if arch == "gemma3_text":
        extra.update(sliding_window=16, query_pre_attn_scalar=8)
    return AutoConfig.for_model(arch, **{**_COMMON, **extra, **overrides})


def tiny_model(arch: str = "qwen2", seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    return model.eval()
