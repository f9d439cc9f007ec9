"""Helpers shared by the benchmarks: random-weight models of a real shape, timing, the matmul peak."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from tinylora.count import resolve_config

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # the default model's shape (Qwen2.5-Coder-0.5B is identical)


def random_model(name: str = MODEL, layers: int | None = None, seed: int = 0):
    """A random-weight model of a catalogue shape: throughput does not depend on trained weights."""
    config = resolve_config(name)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(m: int, k: int, n: int, reps: int = 10, dtype=torch.float32) -> float:
    """Measured GFLOP/s of an [m, k] · [k, n] matmul (2mkn FLOPs)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / median_time(lambda: a @ b, reps) / 1e9


def int8_gflops(m: int, k: int, n: int, reps: int = 10) -> float:
    """The same through fbgemm's dynamic int8 linear (what int8 rollouts run)."""
    from tinylora.int8 import quantize_weight
    torch.backends.quantized.engine = "fbgemm"
    packed = torch.ops.quantized.linear_prepack(quantize_weight(torch.randn(n, k)), None)
    x = torch.randn(m, k)
    return 2 * m * k * n / median_time(lambda: torch.ops.quantized.linear_dynamic(x, packed, True), reps) / 1e9


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
