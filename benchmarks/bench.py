"""Side-by-side measurements on this machine; each prints a table and a final headline line.

    python benchmarks/bench.py trl       # one GRPO step: ours vs TRL GRPOTrainer + PEFT TinyLoRA
    python benchmarks/bench.py ceiling   # rollout tokens/s vs the machine's matmul ceiling
    python benchmarks/bench.py overhead  # adapter cost in training (fwd+bwd) and generation
    python benchmarks/bench.py size      # our adapter file vs PEFT's tinylora at equal trainable count
    python benchmarks/bench.py svd       # SVD start-up: cold/cached, full/randomized, 7B shapes
    python benchmarks/bench.py bank      # 64 rows with 1, 16, 1000 adapters vs PEFT adapter switching
    python benchmarks/bench.py memory    # peak RSS of a training step: tinylora vs LoRA r=1 vs full
    python benchmarks/bench.py serve     # tinylora serve, 32 clients, 1 vs 1,000 adapters vs PEFT set_adapter
                                         # (--peer llama-server: against llama.cpp, 32 and 512 new tokens)
    python benchmarks/bench.py engine    # the engine alone: rows with no, one or distinct adapters (--device; --graphs)
    python benchmarks/bench.py pack      # a million adapters in one pack: bytes, start-up, memory, throughput
    python benchmarks/bench.py batched   # 8 adapters trained in one batched run vs 8 runs one after another
    python benchmarks/bench.py long      # decode step time against context: engine KV buffers vs DynamicCache
                                         # (--peer llama-batched-bench: and llama.cpp on the same model;
                                         # --engine-only: the engine alone, e.g. to 4,096 tokens)
    python benchmarks/bench.py prefill   # prompts of different lengths: one padded batch vs groups of similar length

Results and exact commands: BENCHMARKS.md. `trl`, `bank`, `size` and `serve` need `pip install -e ".[bench,serve]"`.
"""

from __future__ import annotations

import argparse

from adapters import bench_bank, bench_overhead, bench_size
from batched_training import bench_batched
from grpo_vs_trl import bench_trl
from long_context import bench_long
from memory import bench_memory
from pack_scale import bench_pack
from prefill import bench_prefill
from rollout_speed import bench_ceiling
from serve_load import bench_engine, bench_serve
from startup import bench_svd

BENCHES = {"trl": bench_trl, "ceiling": bench_ceiling, "overhead": bench_overhead, "size": bench_size,
           "svd": bench_svd, "bank": bench_bank, "memory": bench_memory, "serve": bench_serve,
           "engine": bench_engine, "pack": bench_pack, "batched": bench_batched,
           "long": bench_long, "prefill": bench_prefill}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=list(BENCHES))
    p.add_argument("--model", default="embedded:qwen2.5-coder-0.5b-instruct",
                   help="real model for trl/ceiling/svd (default: the embedded default)")
    p.add_argument("--layers", type=int, default=24, help="blocks of the random-weight model (default: 24)")
    p.add_argument("--batch", type=int, default=8,
                   help="prompts per step (trl, ceiling), sequences (overhead, memory) or prompts (prefill)")
    p.add_argument("--group", type=int, default=4, help="samples per prompt, G (trl, ceiling)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (overhead, memory)")
    p.add_argument("--new-tokens", type=int, default=48, help="generated tokens per row (serve: at most)")
    p.add_argument("--gen-batch", type=int, default=32, help="rows of the generation timing (overhead)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per trainer (trl, batched)")
    p.add_argument("--runs", type=int, default=8, help="adapters trained (batched)")
    p.add_argument("--peft-adapters", type=int, default=16, help="PEFT adapters loaded (bank)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (serve)")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends (serve)")
    p.add_argument("--adapters", type=int, default=None,
                   help="adapters the server loads (serve: 1,000; pack: 1,000,000)")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # memory: the child process
    p.add_argument("--device", default="cpu", help="engine: cpu or cuda")
    p.add_argument("--graphs", action="store_true",
                   help="engine: each case also with fixed-shape steps (CUDA graphs on a GPU), side by side")
    p.add_argument("--peer", choices=["llama-batched-bench", "llama-server"], default=None,
                   help="long: llama-batched-bench; serve: llama-server (llama.cpp, built once: llama_cpp.py)")
    p.add_argument("--engine-only", action="store_true",
                   help="long: the engine's KV buffers alone (skip transformers' DynamicCache, e.g. at 4,096 tokens)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="serve --peer llama-server: both servers' weights (llama.cpp: an F32 or BF16 GGUF)")
    args = p.parse_args()
    if args.adapters is None:
        args.adapters = 1_000_000 if args.which == "pack" else 1000
    BENCHES[args.which](args)


if __name__ == "__main__":
    main()
