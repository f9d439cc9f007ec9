"""AdapterConfig: every setting that defines an adapter, and nothing else.

The same config (plus the base model) rebuilds an adapter exactly, so it is written into the
adapter file's metadata and read back on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from tinylora.methods import METHODS, Method, method_of

TIE_MODES = ("tiled", "structured")
V_DTYPES = ("fp32", "bf16", "fp16")
SVD_MODES = ("full", "randomized")
# The seven projections of a Llama/Qwen/Gemma transformer block, in depth order within a layer.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    method: str = field(default="tinylora", metadata={"help": f"one of {', '.join(METHODS)}"})
    r: int = field(default=2, metadata={"help": "rank of the frozen truncated SVD (tinylora, lora-xs) or of LoRA"})
    u: int = field(default=1, metadata={"help": "tinylora: trainable numbers per tied group"})
    n_tie: int | str = field(default=16, metadata={"help": "modules per tied group (16: the paper's tying, 13 numbers "
                                                           "on a 7B model); 'all' ties every module to one v"})
    tie: str = field(default="tiled", metadata={"help": "'tiled': consecutive modules in depth order; "
                                                        "'structured': same module type across consecutive layers"})
    targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS),
                                     metadata={"help": "module-name suffixes, or one regex matched on full names"})
    seed: int = field(default=0, metadata={"help": "seed of the fixed random projections P (and LoRA's A init)"})
    v_dtype: str = field(default="fp32", metadata={"help": "dtype in which v is stored and optimised"})
    svd: str = field(default="full", metadata={"help": "'full' (exact) or 'randomized' (fast, for 7B-class models)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "lora: scale is lora_alpha / r (default r)"})

    def __post_init__(self):
        _check(self.method in METHODS, "method", self.method, f"one of {tuple(METHODS)}")
        _check(self.tie in TIE_MODES, "tie", self.tie, f"one of {TIE_MODES}")
        _check(self.v_dtype in V_DTYPES, "v_dtype", self.v_dtype, f"one of {V_DTYPES}")
        _check(self.svd in SVD_MODES, "svd", self.svd, f"one of {SVD_MODES}")
        _check(isinstance(self.r, int) and self.r >= 1, "r", self.r, "an integer >= 1")
        _check(isinstance(self.u, int) and self.u >= 1, "u", self.u, "an integer >= 1")
        if isinstance(self.n_tie, str) and self.n_tie.isdigit():
            self.n_tie = int(self.n_tie)
        _check(self.n_tie == "all" or (isinstance(self.n_tie, int) and self.n_tie >= 1),
               "n_tie", self.n_tie, "an integer >= 1 or 'all'")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)

    @property
    def method_object(self) -> Method:
        """What the method computes: see tinylora.methods."""
        return method_of(self.method)

    @property
    def scale(self) -> float:
        """s in W' = W + s·ΔW (TinyLoRA: 1/√u, LoRA-XS: 1, LoRA: lora_alpha / r)."""
        return self.method_object.scale(self)

    @property
    def numbers_per_group(self) -> int:
        """Trainable numbers in one tied group: u for tinylora, the whole r×r R for lora-xs."""
        return self.method_object.numbers_per_group(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"adapter config has unknown fields {sorted(unknown)}; "
                             "was it written by a newer tinylora?")
        return cls(**data)


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"AdapterConfig.{name}={value!r} is invalid: expected {expected}")
