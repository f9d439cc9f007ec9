"""Many adapters over one base model in one batch.

An AdapterBank stacks the v of N adapter files into one tensor [N, n_groups, k]. Inside
`bank.rows(ids)` every forward (and so `generate`) uses, for row b, adapter ids[b]: each adapted
layer builds one r×r matrix per row, so the extra cost per row is the same for 1 or 10,000
distinct adapters.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .adapter import Adapter, attach
from .io import check_fingerprint, fingerprint, read_adapter_file


class AdapterBank:
    def __init__(self, model: nn.Module, paths: list[str | os.PathLike], *, strict: bool = True, **kwargs):
        if not paths:
            raise ValueError("an AdapterBank needs at least one adapter file")
        first_config, meta, _ = read_adapter_file(paths[0])
        if first_config.method not in ("tinylora", "lora-xs"):
            raise ValueError(f"{paths[0]}: the bank serves tinylora/lora-xs adapters, not {first_config.method!r}")
        self.adapter: Adapter = attach(model, first_config, **kwargs)
        check_fingerprint(meta["fingerprint"], fingerprint(self.adapter), str(paths[0]), strict)
        rows = []
        for p in paths:
            config, _, tensors = read_adapter_file(p)
            if config != first_config:
                raise ValueError(f"{p}: config {config} differs from {paths[0]}: a bank shares one config")
            rows.append(tensors["v"].float())  # [n_groups, k]
        device = self.adapter.factors[0].U.device
        self.v = torch.stack(rows).to(device)  # [n_adapters, n_groups, k]
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return self.v.shape[0]

    @contextlib.contextmanager
    def rows(self, adapter_ids):
        """Within this block, batch row b runs adapter number adapter_ids[b] (an index into the bank)."""
        ids = torch.as_tensor(adapter_ids, dtype=torch.long, device=self.v.device)  # [batch]
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"adapter ids must lie in [0, {len(self)}), got {ids.tolist()}")
        self.adapter._row_v = self.v[ids]  # [batch, n_groups, k]
        try:
            yield
        finally:
            self.adapter._row_v = None
