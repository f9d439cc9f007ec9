"""Test helper for fixed-shape decode steps (generation/graphs.py): which decode forwards ran the fixed way and
which the ordinary way, with a trap for host syncs inside the fixed ones. A CUDA graph cannot hold a host
sync (a capture fails on it), and on a CPU nothing else would notice one."""

from __future__ import annotations

import contextlib

import torch

SYNCS = {torch.Tensor: ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"),
         torch: ("equal", "nonzero")}


@contextlib.contextmanager
def no_host_sync():
    """Every call that would wait for a GPU raises inside this block."""
    saved = [(owner, name, getattr(owner, name)) for owner, names in SYNCS.items() for name in names]

    def trap(name):
        def raising(*args, **kwargs):
            raise AssertionError(f"{name} inside a fixed-shape decode step: a host sync no CUDA graph can hold")
        return raising
    try:
        for owner, name, _ in saved:
            setattr(owner, name, trap(name))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


class DecodeSteps:
    """Counts `model`'s decode forwards: `fixed` (a 4D mask: the fixed-shape step, run under no_host_sync) and
    `ordinary` (one new token per row with a 2D mask; prefills pass logits_to_keep and are not counted)."""

    def __init__(self, model):
        self.fixed = self.ordinary = 0
        forward = model.forward

        def counted(*args, **kwargs):
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            if mask is not None and mask.dim() == 4:
                self.fixed += 1
                with no_host_sync():
                    return forward(*args, **kwargs)
            if ids is not None and ids.shape[1] == 1 and "logits_to_keep" not in kwargs:
                self.ordinary += 1
            return forward(*args, **kwargs)
        model.forward = counted  # an instance attribute: nn.Module.__call__ runs it
