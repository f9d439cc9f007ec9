"""One adapter file: one safetensors file holding the trained tensors (v) and JSON metadata.

13 fp32 parameters make a file of well under 1 KB: P is regenerated from the seed and U, Σ, V from
the base weights, so neither is stored. A compact fingerprint of the base (target count, shapes per
module type, a hash of names and shapes, the weights' Frobenius norm, a hash of their bytes and one of
their values rounded to bf16) turns loading onto the wrong model, or onto one whose targeted weights
differ in any module, into a clear error instead of silent garbage, while the same model in fp32 or bf16
loads. A checksum of the stored tensors catches a file whose numbers were changed or damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from tinylora.atomic import atomic_write_bytes
from tinylora.config import AdapterConfig
from tinylora.version import __version__

FORMAT = "tinylora-adapter"
FORMAT_VERSION = "2"  # 2: a checksum of the stored tensors and a dtype-independent digest of the base
READABLE_VERSIONS = ("1", "2")
NORM_RTOL = 1e-4  # bf16 vs fp32 copies of one model agree to ~1e-6; different fine-tunes do not


def fingerprint(adapter) -> dict:
    kinds: dict[str, list] = {}
    for t in adapter.targets:
        shapes = kinds.setdefault(t.kind, [])
        if list(t.shape) not in shapes:
            shapes.append(list(t.shape))
    names = "\n".join(f"{t.name}:{t.shape}" for t in adapter.targets)
    norm = adapter.base_norm  # measured at attach, before any merge
    return {
        "n": len(adapter.targets),
        "shapes": {k: v[0] if len(v) == 1 else v for k, v in kinds.items()},
        "names": hashlib.sha256(names.encode()).hexdigest()[:12],
        "norm": float(f"{norm:.8g}"),
        "bytes": hashlib.sha256("".join(adapter.digests).encode()).hexdigest()[:12],
        # every targeted weight rounded to bf16: equal for the same model in fp32 or bf16, different as soon as
        # any targeted module changes
        "values": hashlib.sha256("".join(adapter.value_digests).encode()).hexdigest()[:12],
    }


def base_name(model) -> str:
    """How a file names its base: the hub id (embedded models carry theirs), or a local folder's own name, never
    its path: a file meant to be shared holds no user's folders, and the same v gives the same bytes anywhere."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if os.path.isabs(name) or os.path.exists(name) or "\\" in name:
        return Path(name.replace("\\", "/")).name
    return name


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the stored tensors' names, dtypes, shapes and bytes: a flipped bit of v is caught."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def write_adapter_file(path: str | os.PathLike, config: AdapterConfig, base: str, base_fingerprint: dict,
                       tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter file from its parts (how a pack extracts one without a model), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tinylora": __version__,
            "config": config.to_json(), "base": base, "checksum": checksum(tensors),
            "fingerprint": json.dumps(base_fingerprint, separators=(",", ":"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, canonical_header(save(tensors, metadata=meta)))
    return path


def canonical_header(raw: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes metadata in hash-map
    order, which differs from one process to the next, so equal adapters would not be equal bytes."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data that follows stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def read_file(path: str | os.PathLike) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """Parse and validate one adapter file without a model: (config, metadata, tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncation and bad headers
        raise ValueError(f"{path}: not a readable safetensors adapter (truncated or corrupted?): {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tinylora adapter (metadata 'format' is {meta.get('format')!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: adapter format version {meta.get('format_version')!r} is not supported "
                         f"(this tinylora reads versions {', '.join(READABLE_VERSIONS)})")
    if meta["format_version"] != "1" and meta.get("checksum") != checksum(tensors):
        raise ValueError(f"{path}: checksum mismatch: the stored numbers were changed or damaged after saving")
    try:
        config = AdapterConfig.from_json(meta["config"])
        meta["fingerprint"] = json.loads(meta["fingerprint"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: adapter metadata is damaged: {e}") from e
    for k, t in tensors.items():
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"{path}: tensor {k!r} holds NaN or inf values")
    return config, meta, tensors


def check_fingerprint(expected: dict, actual: dict, source: str, strict: bool = True) -> None:
    problems = []
    if expected["n"] != actual["n"]:
        problems.append(f"the file was made for {expected['n']} target modules, this model has {actual['n']}")
    for kind in sorted(set(expected["shapes"]) | set(actual["shapes"])):
        e, a = expected["shapes"].get(kind), actual["shapes"].get(kind)
        if e != a:
            problems.append(f"{kind}: file expects shape {e}, model has {a}")
    if not problems and expected["names"] != actual["names"]:
        problems.append("target module names differ (same shapes, different model layout)")
    if not problems and "values" in expected and expected["values"] != actual["values"] \
            and expected["bytes"] != actual["bytes"]:
        problems.append("the targeted weights differ (their values rounded to bf16 do not match): a different "
                        "checkpoint of this architecture, or a fine-tuned copy? (an fp16 copy of the same model "
                        "can differ in rounding too: then pass strict=False)")
    elif not problems and abs(expected["norm"] - actual["norm"]) > NORM_RTOL * max(abs(expected["norm"]), 1e-12):
        problems.append(f"the targeted weights differ (Frobenius norm {expected['norm']:.6g} in the file, "
                        f"{actual['norm']:.6g} in this model): a different checkpoint of this architecture?")
    if problems:
        msg = f"{source} does not fit this base model: " + "; ".join(problems)
        if strict:
            raise ValueError(msg + ". Pass strict=False (--no-strict) to load anyway.")
        warnings.warn(msg, stacklevel=3)
    elif expected["bytes"] != actual["bytes"] and "values" not in expected:  # a version-1 file
        warnings.warn(f"{source}: base weights match in value but not byte for byte (another dtype?)", stacklevel=3)
