"""Loading base models and tokenizers (local folder or hub id)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(name_or_path: str, dtype: str = "fp32", device: str = "cpu"):
    """(model, tokenizer) from a transformers model folder or hub id, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import DEFAULT_MODEL, ensure_default_model
    if name_or_path == DEFAULT_MODEL:
        name_or_path = str(ensure_default_model())
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype]).to(device)
    except OSError as e:
        raise SystemExit(f"cannot load model {name_or_path!r}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
