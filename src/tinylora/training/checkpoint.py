"""Training checkpoints: the trainable tensors, AdamW's state and the step, in one safetensors file.

Written atomically (temp file + rename) after every step, so Ctrl-C or a crash loses at most the
step in flight; for TinyLoRA the whole file is a few hundred bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from tinylora.atomic import atomic_write_bytes


def save_checkpoint(path: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict | None = None) -> None:
    opt = optimizer.state_dict()
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    scalars = {}
    for idx, state in opt["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"opt/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{k}"] = float(v)
    meta = {"step": str(step), "opt_scalars": json.dumps(scalars), "param_groups": json.dumps(opt["param_groups"]),
            "extra": json.dumps(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore the optimizer in place; return (step, trainable tensors, extra)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step = int(meta["step"])
        scalars = json.loads(meta["opt_scalars"])
        groups = json.loads(meta["param_groups"])
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint (truncated or corrupted?): {e}") from e
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    for k, v in scalars.items():
        idx, name = k.split("/", 1)
        state.setdefault(int(idx), {})[name] = torch.tensor(v)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    return step, params, json.loads(meta.get("extra", "{}"))
