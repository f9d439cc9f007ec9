"""Metrics where users look: TensorBoard or Weights & Biases beside metrics.jsonl (`--report-to`).

Both are optional extras (`pip install 'tinylora[tensorboard]'` / `'tinylora[wandb]'`). W&B runs offline
unless WANDB_API_KEY or WANDB_MODE says otherwise, so a machine without network never hangs on it.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "step"}


class Tracker:
    """log(metrics) once per step, log_eval(name, result) for evaluations, close() at the end."""

    def __init__(self, write, close):
        self._write, self._close = write, close
        self.last_step = 0

    def log(self, metrics: dict) -> None:
        self.last_step = metrics["step"]
        self._write({f"train/{k}": v for k, v in _scalars(metrics).items()}, metrics["step"])

    def log_eval(self, name: str, result: dict) -> None:
        keys = ("accuracy", "lenient_accuracy", "pass_at_k", "lenient_pass_at_k")
        self._write({f"eval_{name}/{k}": float(result[k]) for k in keys if k in result}, result.get("step", 0))

    def close(self) -> None:
        self._close()


def make_tracker(report_to: str, out: Path, config: dict) -> Tracker | None:
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--report-to tensorboard needs the tensorboard package: "
                             "pip install 'tinylora[tensorboard]'") from None
        writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))

        def write(values, step):
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return Tracker(write, writer.close)
    if report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise ValueError("--report-to wandb needs the wandb package: pip install 'tinylora[wandb]'") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        Path(out).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tinylora"), dir=str(out), config=config, mode=mode)
        return Tracker(lambda values, step: run.log(values, step=step), run.finish)
    raise ValueError(f"report_to={report_to!r}: expected none, tensorboard or wandb")
