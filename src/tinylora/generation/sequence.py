"""What the engine runs: a request's sampling settings and one row of the batch (a Sequence), with the tokens it
has got so far."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens holding this much probability
    seed: int | None = None  # this row's own generator (None: the engine's shared stream, or a random seed)
    stop_token_ids: tuple[int, ...] = ()  # ends a row besides the model's end-of-sequence tokens
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks: equal work per request)


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    sampling: Sampling
    R: torch.Tensor | None = None  # [n_modules, r, r] this row's adapter (bank engines; None: the base)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token under the sampling law
    finish_reason: str | None = None  # "stop" (end of sequence or stop token), "length", "error", or the caller's
    generator: torch.Generator | None = None
    stream: int = 0  # inside `generate`: which seeded stream draws this row's uniforms

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
