"""`bench.py serve --peer llama-server`: `tinylora serve` against llama.cpp's `llama-server`, side by side.

Both servers run the embedded default in fp32 (llama.cpp: its GGUF requantized to F32, the same weights;
see llama_cpp.py), or both in bf16 with `--dtype bf16` (llama.cpp: a BF16 GGUF), on the same cores, both up
for the whole run and driven one at a time by the same clients: `--clients` concurrent closed-loop clients
streaming greedy completions of exactly N tokens (`ignore_eos`) for the default task's chat prompts, at N = 32
(`--requests-per-client` each) and N = 512 (one each). The workloads take turns, `--reps` rounds each (ABBA
order within each N). Reported per workload, medians over the rounds: completion tok/s, p50/p99 request
latency and p50 time to first token; the ratios of a round's rates, per round and their median.
  - tinylora: the base model; a different adapter per request (of `--adapters` loaded, u=1, n_tie=16).
  - llama-server: no adapters (the plain model, `-np` = clients), at N = 32 also with its prompt cache off
    (`cache_prompt: false`: every prompt computed whole, as tinylora must with a different adapter per
    request); the same server with 4 of those adapters
    as LoRA GGUFs (`tinylora export`, then llama.cpp's converter), a different one per request, at N = 32
    only (mixed LoRAs are slow there).
"""

from __future__ import annotations

import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import table
from llama_cpp import binaries, lora_gguf, model_gguf
from serve_load import free_port, start, start_tinylora, stop, write_adapters

from tinylora.models import load_model
from tinylora.tasks.prompts import chat_prompts

LENGTHS = (32, 512)
LLAMA_LORAS = 4


async def drive_streaming(port: int, bodies: list[list[dict]]) -> dict:
    """bodies[c] = client c's requests, streamed one after another; all clients at once."""
    import httpx
    latencies, first, tokens = [], [], 0
    # a fresh connection per request: llama-server closes kept-alive connections after a few requests, and a
    # request sent on one it has just closed fails ("Server disconnected")
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=3600, limits=limits) as http:
        (await http.post("/completions", json={**bodies[0][0], "max_tokens": 2})).raise_for_status()  # warm-up

        async def one(body) -> None:
            nonlocal tokens
            t, got, counted = time.perf_counter(), None, None
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if got is None and any(c.get("text") for c in chunk.get("choices") or []):
                        got = time.perf_counter() - t
                    if chunk.get("usage"):
                        counted = chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t)
            first.append(got if got is not None else latencies[-1])
            tokens += counted if counted is not None else body["max_tokens"]  # ignore_eos: exactly max_tokens

        async def client(mine):
            for body in mine:
                await one(body)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(m) for m in bodies))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    out = {"requests": len(latencies), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
           "p50": statistics.median(latencies), "p99": q[98], "ttft": statistics.median(first)}
    print(f"{len(bodies)} clients, {bodies[0][0]['max_tokens']} tokens: {out}", file=sys.stderr, flush=True)
    return out


def bench_serve_peer(args) -> None:
    clients = args.clients
    work = Path(tempfile.mkdtemp(prefix="tinylora-peer-bench-"))
    model, tok = load_model(args.model, "fp32", "cpu")
    from tinylora.api import DataConfig
    prompts = chat_prompts(tok, [p.question for p in DataConfig().problems("test", clients * args.requests_per_client)])
    ours_dir = work / "ours"
    write_adapters(model, ours_dir, args.adapters, work / "peft", LLAMA_LORAS)
    del model
    loras = [lora_gguf(work / "peft" / f"a{k:04d}", args.model, work / f"lora{k}.gguf") for k in range(LLAMA_LORAS)]
    gguf, bin_dir = model_gguf(args.model, args.dtype.upper()), binaries()
    threads = str(torch.get_num_threads())

    def plan(new: int, per_client: int, extra) -> list[list[dict]]:
        return [[{"prompt": prompts[c * per_client + j], "max_tokens": new, "temperature": 0, "ignore_eos": True,
                  **extra(c * per_client + j)} for j in range(per_client)] for c in range(clients)]

    distinct = lambda i: {"model": f"a{(i * 7919) % args.adapters:04d}"}  # noqa: E731
    port = free_port()
    context = clients * (max(len(tok(p).input_ids) for p in prompts) + max(LENGTHS) + 16)
    llama = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
             "-np", str(clients), "-c", str(context), "-t", threads, "-tb", threads, "--no-webui",
             "--load-mode", "none"]  # weights read into its own memory (no mmap), as tinylora does

    def per(new: int) -> int:
        return args.requests_per_client if new <= 32 else 1

    def ours(new: int, name: str, pick) -> tuple:
        return (f"tinylora serve: {name}", new), plan(new, per(new), pick), ours_port

    def peer(new: int, cache_prompt: bool = True) -> tuple:
        name = "llama-server: no adapter" + ("" if cache_prompt else ", prompt cache off (cache_prompt: false)")
        return (name, new), plan(new, per(new), lambda i: {"cache_prompt": cache_prompt}), llama_port

    # Both servers stay up (an idle one costs nothing) and take turns workload by workload, ABBA, so that the
    # machine's drift hits the runs that are compared (the same N, next to each other in time) alike.
    runs = collections.defaultdict(list)
    ours_proc, ours_port = start_tinylora(args.model, ours_dir, clients, args.dtype)
    llama_port, llama_proc = free_port(), None
    llama[llama.index("--port") + 1] = str(llama_port)
    try:
        llama_proc = start(llama, llama_port)  # no --lora at all: the plain model's graph
        for new in LENGTHS:
            for k in range(args.reps):
                turns = [ours(new, "base model", lambda i: {"model": "base"}),
                         ours(new, f"a different adapter per request (of {args.adapters:,})", distinct), peer(new)]
                if new == min(LENGTHS):  # llama-server reuses the keys and values of a slot's last prompt's common
                    turns.append(peer(new, cache_prompt=False))  # prefix; an adapter per request rules that out
                for key, bodies, port in (turns if k % 2 == 0 else turns[::-1]):
                    runs[key].append(asyncio.run(drive_streaming(port, bodies)))
    finally:
        stop(ours_proc)
        if llama_proc is not None:
            stop(llama_proc)
    port = free_port()
    llama[llama.index("--port") + 1] = str(port)
    proc = start([*llama, *[x for lora in loras for x in ("--lora", str(lora))], "--lora-init-without-apply"], port)
    try:
        new = min(LENGTHS)
        runs[(f"llama-server: {LLAMA_LORAS} LoRAs mixed, one per request", new)].append(asyncio.run(
            drive_streaming(port, plan(new, per(new), lambda i: {"lora": [{"id": i % LLAMA_LORAS, "scale": 1.0}]}))))
    finally:
        stop(proc)
    results = {key: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for key, rs in runs.items()}

    print(f"\n{args.model}, {args.dtype} on {threads} threads (llama.cpp: {args.dtype.upper()} GGUF); "
          f"{clients} concurrent streaming clients, greedy, exactly N new tokens per request; adapters u=1, n_tie=16\n")
    table(["server and workload", "N", "requests", "tok/s", "p50 s", "p99 s", "TTFT p50 s"],
          [[name, new, int(r["requests"]), f"{r['tok_s']:.1f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
            f"{r['ttft']:.2f}"]
           for (name, new), r in sorted(results.items(), key=lambda kv: kv[0][1])])
    for new in LENGTHS:
        ours_r = next(rs for (name, n), rs in runs.items() if n == new and "different adapter" in name)
        base_r = runs[("tinylora serve: base model", new)]
        peer_r = runs[("llama-server: no adapter", new)]
        ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(ours_r, peer_r)]
        own = [a["tok_s"] / b["tok_s"] for a, b in zip(ours_r, base_r)]
        print(f"N = {new}: tinylora with a different adapter per request / llama-server without adapters: "
              f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"/ tinylora's base model: {statistics.median(own):.2f}x")
        uncached = [rs for (name, n), rs in runs.items() if n == new and "prompt cache off" in name]
        if uncached:
            ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(ours_r, uncached[0])]
            print(f"N = {new}: ... / llama-server without adapters, prompt cache off: {statistics.median(ratios):.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
