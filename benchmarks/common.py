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
        if getattr(config, "layer_types", None):  # one per block: older transformers size the cache by it
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _times(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median_time(fn, reps: int, warmup: int = 1) -> float:
    return statistics.median(_times(fn, reps, warmup))


def interleaved_times(setups: dict, run, reps: int) -> dict[str, list[float]]:
    """Time `run` under each context in `setups`, taking turns within every repetition, so slow drift of a
    shared machine hits all variants alike. setups: name -> () -> context manager. Returns name -> seconds."""
    times = {name: [] for name in setups}
    for rep in range(reps + 1):  # repetition 0 warms up every variant and is dropped
        for name, setup in setups.items():
            with setup():
                t = time.perf_counter()
                run()
                if rep:
                    times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repetitions of num/den measured in the same repetition (robust to drift between them)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def best_time(fn, reps: int) -> float:
    """Fastest of reps calls: what the machine can do, for a peak (other processes only slow it down)."""
    return min(_times(fn, reps))


def matmul_gflops(m: int, k: int, n: int, reps: int = 10, dtype=torch.float32) -> float:
    """Best measured GFLOP/s of an [m, k] · [k, n] matmul (2mkn FLOPs)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / best_time(lambda: a @ b, reps) / 1e9


def packed_gflops(m: int, k: int, n: int, reps: int = 10) -> float:
    """The same through oneDNN with the weight pre-packed (what packed fp32 rollouts run)."""
    from tinylora.generation.weights import PackedWeights
    x, w = torch.randn(m, k), PackedWeights(torch.nn.Linear(k, n, bias=False))
    packed = next(iter(w.copies.values()))
    return 2 * m * k * n / best_time(lambda: w.linear(x, packed, None), reps) / 1e9


def int8_gflops(m: int, k: int, n: int, reps: int = 10) -> float:
    """The same through fbgemm's dynamic int8 linear, with a quantized weight [n, k]."""
    from tinylora.generation.weights import quantize_weight
    torch.backends.quantized.engine = "fbgemm"
    packed = torch.ops.quantized.linear_prepack(quantize_weight(torch.randn(n, k)), None)
    x = torch.randn(m, k)
    return 2 * m * k * n / best_time(lambda: torch.ops.quantized.linear_dynamic(x, packed, True), reps) / 1e9


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
