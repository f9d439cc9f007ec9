"""Which adapter work each row of an engine forward does: with a bank, every row its own s·R, and the rows whose
R is zero (the base) none at all; without one, the engine's one adapter (or nothing)."""

from __future__ import annotations

import contextlib

import torch


class RowAdapters:
    def __init__(self, bank=None, adapter=None):
        """`bank`: an AdapterBank (rows carry R [M, r, r] or None); else `adapter`, the engine's one (or None)."""
        self.bank, self.adapter = bank, adapter
        self._active = {}  # id(R) -> (R, indices [k] of the rows with an adapter, their R [k, M, r, r])
        self._one = None  # (v, s·R [M, r, r]) of the one adapter, for fixed-shape steps

    def forget(self) -> None:
        """Drop what was found about the running batch's rows (it has ended)."""
        self._active = {}

    def stack(self, Rs: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Rows' R (None: the base) as one tensor [b, M, r, r]; None without a bank."""
        if self.bank is None:
            return None
        return torch.stack([R if R is not None else self.bank.zeros() for R in Rs])

    def or_zeros(self, R: torch.Tensor | None, n: int) -> torch.Tensor:
        return R if R is not None else self.bank.zeros()[None].expand(n, -1, -1, -1)

    def context(self, R: torch.Tensor | None):
        """The adapter context of a forward over rows with adapters R [n, M, r, r]: per-row work only for the
        rows whose R is not zero (a zero R adds exactly nothing), none at all when no row has one."""
        if self.bank is None:
            return contextlib.nullcontext()
        if R is None:
            return self.bank.adapter.disabled()
        rows, R_active = self.adapted(R)
        if len(R_active) == 0:
            return self.bank.adapter.disabled()
        return self.bank.adapter.per_row(R_active, None if len(R_active) == len(R) else rows)

    def adapted(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [k], R [k, M, r, r]) of the rows whose R is not zero; found once per set of rows (R changes
        only when rows join or leave; a prefill has its own)."""
        key = id(R)
        if key not in self._active:
            if len(self._active) >= 4:
                self._active.clear()
            rows = R.flatten(1).any(dim=1).nonzero().flatten()  # [k]
            self._active[key] = (R, rows, R if len(rows) == len(R) else R.index_select(0, rows))
        return self._active[key][1:]  # the entry holds R itself: its id is not reused meanwhile

    def for_fixed_step(self, R: torch.Tensor | None, n: int, hooked: bool) -> torch.Tensor | None:
        """What a fixed-shape step runs for n rows: a bank's R [n, M, r, r] (None when no row has an adapter), or
        the one adapter's s·R in every row when its hooks run (`hooked`), else None."""
        if self.bank is not None:
            return R if R is not None and len(self.adapted(R)[1]) else None
        return self.one().expand(n, -1, -1, -1) if hooked else None

    def one(self) -> torch.Tensor:
        """s·R [M, r, r] of the one adapter, rebuilt when v has changed (a training step)."""
        v = self.adapter.v.detach()
        if self._one is None or not torch.equal(self._one[0], v):  # one host test per step, not per module
            self._one = (v.clone(), torch.stack([self.adapter.R(i) for i in range(len(self.adapter.targets))]))
        return self._one[1]
