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


def tiny_tokenizer(vocab_size: int = 128):
    """A whitespace word-level tokenizer over "<unk> <pad> <eos> #### 0-9 + - = ? t14 ..." (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<pad>", "<eos>", "####"] + [str(d) for d in range(10)] + ["+", "-", "=", "?"]
    words += [f"t{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_model_and_tokenizer(arch: str = "qwen2", seed: int = 0, **overrides):
    model = tiny_model(arch, seed=seed, **overrides)
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
