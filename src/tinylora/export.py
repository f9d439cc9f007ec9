"""Export an adapter for engines that do not know TinyLoRA.

PEFT LoRA of rank r: B = U and A = s·Σ R Vᵀ reproduce ΔW = s·U Σ R Vᵀ exactly (lora_alpha = r, so
PEFT's own scaling is 1). Any engine that serves LoRA (PEFT, vLLM, llama.cpp, ...) can serve it.
Merged model: ΔW folded into the weights, written with `save_pretrained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinylora.adapter import Adapter
from tinylora.storage.file import base_name


def lora_factors(adapter: Adapter, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B @ A = ΔW of module i."""
    return adapter.method.lora_factors(adapter, i)


@torch.no_grad()
def export_peft(adapter: Adapter, out_dir: str | os.PathLike) -> Path:
    if not adapter.targets:  # full, frozen; a method with targets but no LoRA form raises in lora_factors
        raise ValueError(f"method {adapter.config.method!r} has no LoRA form; export a merged model instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, t in enumerate(adapter.targets):
        A, B = lora_factors(adapter, i)
        tensors[f"base_model.model.{t.name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"base_model.model.{t.name}.lora_B.weight"] = B.contiguous().cpu()
    r = adapter.config.r
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "target_modules": sorted({t.name for t in adapter.targets}),
        "base_model_name_or_path": base_name(adapter.base_model) or None,
        "revision": None, "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


@torch.no_grad()
def export_merged(adapter: Adapter, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write base + ΔW as a plain transformers model folder; the live model is left unmerged."""
    out = Path(out_dir)
    was_merged = adapter.merged
    adapter.merge()
    try:
        adapter.base_model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    finally:
        if not was_merged:
            adapter.unmerge()
    return out
