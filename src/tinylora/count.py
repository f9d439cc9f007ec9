"""Count trainable parameters of any method on any model, from its config alone (meta device, no weights)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tinylora.config import AdapterConfig
from tinylora.embedded import CATALOGUE
from tinylora.methods import method_of


@lru_cache(maxsize=1)
def catalog() -> dict[str, dict]:
    """Configs of popular models shipped with tinylora, by hub id, so counting works offline; the embedded models
    by their `embedded:` name, as their GGUF builds them (both with an output matrix of their own)."""
    return json.loads(resources.files("tinylora").joinpath("catalog/models.json").read_text())


def resolve_config(model: str):
    """A transformers config from a catalogue id, a model folder, a config.json, or (online) the hub."""
    p = Path(model)
    if p.is_dir() and (p / "config.json").is_file():
        return AutoConfig.from_pretrained(str(p))
    if p.is_file():
        data = json.loads(p.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    known = catalog()
    if model in known:
        data = dict(known[model])
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if _hub_reachable():
        try:
            return AutoConfig.from_pretrained(model)
        except Exception:
            pass
    raise ValueError(f"unknown model {model!r}: not a folder with config.json, not a config file, and not in "
                     f"tinylora's offline catalogue. Known ids: {', '.join(sorted(known))}; embedded: "
                     f"{', '.join(CATALOGUE)}")


def _hub_reachable() -> bool:
    """True when the hub's host resolves (a closed network fails at once instead of retrying for 30 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def meta_model(model: str):
    config = resolve_config(model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count(model: str, config: AdapterConfig) -> dict:
    """Trainable parameters, adapted modules, tied groups and storage of `config` on `model`."""
    m = meta_model(model)
    total = sum(p.numel() for p in m.parameters())
    method = config.method_object
    targets = method.targets(m, config)
    n = method.count(targets, config, total)
    groups = len(method.groups(targets, config))
    return {
        "model": model, "method": config.method, "r": config.r, "u": config.u, "n_tie": config.n_tie,
        "tie": config.tie, "modules": len(targets), "layers": m.config.num_hidden_layers, "groups": groups,
        "trainable_params": n, "total_params": total,
        "bytes": {"fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n},
    }


def format_count(c: dict) -> str:
    rows = [("model", c["model"]), ("method", c["method"])]
    settings = method_of(c["method"]).settings
    if "r" in settings:
        rows.append(("rank r", c["r"]))
    if "u" in settings:
        rows.append(("u", c["u"]))
    if "n_tie" in settings:
        rows += [("n_tie / tie", f"{c['n_tie']} / {c['tie']}"), ("groups", f"{c['groups']:,}")]
    rows += [("adapted modules", f"{c['modules']:,} ({c['layers']} layers)"),
             ("trainable params", f"{c['trainable_params']:,}"),
             ("model params", f"{c['total_params']:,}"),
             ("bytes fp32 / bf16", f"{c['bytes']['fp32']:,} / {c['bytes']['bf16']:,}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
