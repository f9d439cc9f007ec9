"""Loading base models and tokenizers (local folder or hub id) onto a device, in a dtype that suits it."""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str = "auto") -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'mps' on Apple silicon, else 'cpu'; others are checked."""
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)} (or cuda:N)")
    if kind in ("auto", "cuda") and device in ("auto", "cuda") and torch.cuda.is_available() \
            and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU per process
    if kind == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' → bf16 on a GPU that supports it (half the memory, fast tensor cores), else fp32 (CPUs without
    bf16 kernels run bf16 matmuls far slower than fp32)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) from a transformers model folder, a hub id or `embedded:NAME`, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylora.embedded import PREFIX, ensure_embedded, lookup
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    hub_id = None
    if name_or_path.startswith(PREFIX):
        hub_id = lookup(name_or_path).hub_id
        name_or_path = str(ensure_embedded(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype]).to(device)
    except OSError as e:
        raise ValueError(f"cannot load model {name_or_path!r}: {e}") from e
    if hub_id:  # named by what it is, not by this machine's cache folder
        model.config._name_or_path = hub_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
