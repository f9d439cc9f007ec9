"""The evaluation defaults, in one place: `tinylora eval`, the evaluations inside `train` and the Python API
all read them from here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = field(default=32, metadata={"help": "completion length limit, as in training"})
    batch_size: int = field(default=50, metadata={"help": "sequences generated together"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature with --samples"})


EVAL_DEFAULTS = EvalConfig()
