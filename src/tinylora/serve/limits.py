"""What one `tinylora serve` accepts: each limit is a --flag of the same name."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

ZERO_ALLOWED = ("max_prompt_tokens", "prefill_chunk", "admit_wait_ms")


@dataclass
class Limits:
    max_batch: int = field(default=32, metadata={"help": "rows decoding together; more wait for a free row"})
    max_queue: int = field(default=256, metadata={"help": "rows running or waiting; beyond this a request gets 429"})
    max_tokens: int = field(default=1024, metadata={"help": "the largest max_tokens a request may ask for"})
    max_prompt_tokens: int = field(default=0, metadata={
        "help": "longest prompt accepted; 0: the model's context length - 1"})
    max_n: int = field(default=16, metadata={"help": "choices per request (n)"})
    max_request_bytes: int = field(default=1 << 20, metadata={"help": "larger request bodies get 413"})
    max_adapter_bytes: int = field(default=1 << 20, metadata={"help": "larger adapter files are refused"})
    prefill_chunk: int = field(default=256, metadata={
        "help": "while rows decode, a joining prompt goes through the model this many tokens per step (0: whole)"})
    admit_wait_ms: int = field(default=5, metadata={
        "help": "when idle, how long the first request waits for others, so a burst is prefilled together"})

    def __post_init__(self):
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name in ZERO_ALLOWED else 1
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{f.name}={value!r} is invalid (--{f.name.replace('_', '-')}): "
                                 f"expected an integer >= {least}")
