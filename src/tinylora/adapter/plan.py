"""Which linear layers get adapted, and which of them share one v (the tying plan)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    kind: str  # last name component, e.g. "q_proj"
    layer: int  # transformer block index (-1 when the name has none)
    shape: tuple[int, int]  # weight (out, in)


def find_targets(model: nn.Module, targets: list[str] | str) -> list[Target]:
    """Linear layers matching `targets`, in depth order (the model's own module order).

    A list matches the last component of a module's name (like PEFT); a string is a regex matched
    against the full name. Anything that matches nothing is an error listing what exists.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [(n, m) for n, m in linears if pattern.fullmatch(n)]
        missing = [] if chosen else [targets]
    else:
        wanted = set(targets)
        chosen = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in wanted]
        found = {n.rsplit(".", 1)[-1] for n, _ in chosen}
        missing = [t for t in targets if t not in found]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"targets {missing} match no linear layer of {type(model).__name__}; "
                         f"available module names: {available}")
    out = []
    for name, module in chosen:
        m = _LAYER_INDEX.search(name)
        out.append(Target(name, name.rsplit(".", 1)[-1], int(m.group(1)) if m else -1,
                          tuple(module.weight.shape)))
    return out


def tie_groups(targets: list[Target], n_tie: int | str, tie: str = "tiled") -> list[list[int]]:
    """Partition target indices into groups of n_tie ('all': one group) that share one v.

    tiled: chunks of consecutive modules in depth order (layer 0 q,k,v,o,gate,up,down, layer 1 ...).
    structured: modules ordered by type first (all q_proj by layer, then all k_proj ...), then chunked,
    so a group holds one module type across consecutive layers. Both give ceil(n / n_tie) groups; when
    the layer count is not a multiple of n_tie a structured group can span two types at the seam.
    """
    n = len(targets)
    size = n if n_tie == "all" else int(n_tie)
    order = list(range(n))
    if tie == "structured":
        kinds = list(dict.fromkeys(t.kind for t in targets))  # first-seen order: q, k, v, o, ...
        order.sort(key=lambda i: (kinds.index(targets[i].kind), targets[i].layer, i))
    return [order[i:i + size] for i in range(0, n, size)]


def group_index(groups: list[list[int]], n: int) -> list[int]:
    """The inverse of a tying plan: the group of each of the n targets."""
    group_of = [0] * n
    for g, members in enumerate(groups):
        for i in members:
            group_of[i] = g
    return group_of
