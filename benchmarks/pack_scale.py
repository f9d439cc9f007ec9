"""`bench.py pack`: a million adapters in one pack: bytes per adapter, start-up, memory, /v1/models, throughput.

Builds packs of `--adapters` (default 1,000,000) random adapters of the paper's size (u=1, n_tie=16: 11
numbers on the default model; a second pack of 13, the 1.5B model's count, for its size alone), then runs
`tinylora serve` twice, side by side: over no adapters and over the pack. Reported: pack bytes per adapter,
time to /health and RSS of each server (when ready, and after the same amount of generation), /v1/models
latency on the first and a deep page, and completion tokens/s of `--clients` closed-loop clients: the base
model on the server without adapters, then one adapter for all vs a different adapter per request.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import table
from serve_load import drive, free_port, start, stop

from tinylora import AdapterConfig, attach
from tinylora.models import load_model
from tinylora.storage.file import base_name, fingerprint
from tinylora.storage.pack import Pack
from tinylora.tasks.prompts import chat_prompts

CHUNK = 100_000


def build(path: Path, like: tuple, n: int, seed: int = 0) -> float:
    """A pack of n adapters named u0000000..., random v at the scale trained ones reach; seconds taken."""
    t = time.perf_counter()
    pack = Pack.create(path, like=like)
    gen = torch.Generator().manual_seed(seed)
    for start_ in range(0, n, CHUNK):
        v = torch.randn(min(CHUNK, n - start_), *like[3], generator=gen) * 0.05
        pack.put({f"u{start_ + i:07d}": v[i] for i in range(len(v))})
    pack.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pack.close()
    return time.perf_counter() - t


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bench_pack(args) -> None:
    n, clients, per_client, new = args.adapters, args.clients, args.requests_per_client, args.new_tokens
    work = Path(tempfile.mkdtemp(prefix="tinylora-pack-bench-"))
    model, tok = load_model(args.model, "fp32", "cpu")
    adapter = attach(model, AdapterConfig(u=1, n_tie=16), progress=False)
    like = (adapter.config, fingerprint(adapter), base_name(model), tuple(adapter.v.shape))
    adapter.detach()
    from tinylora.api import DataConfig
    prompts = chat_prompts(tok, [p.question for p in DataConfig().problems("test", clients * per_client)])
    del model

    sizes = {}
    for numbers in (like[3][0], 13):
        shape = (numbers, 1)
        path = work / f"p{numbers}.tlpack"
        secs = build(path, (*like[:3], shape) if numbers != like[3][0] else like, n)
        sizes[numbers] = (path, secs, path.stat().st_size)
    pack_path = sizes[like[3][0]][0]

    def plan(model_of) -> list[list[dict]]:
        return [[{"model": model_of(c * per_client + j), "prompt": prompts[c * per_client + j], "max_tokens": new,
                  "temperature": 0, "ignore_eos": True} for j in range(per_client)] for c in range(clients)]

    servers, runs = {}, {}
    for label, extra in (("no adapters", []), (f"a pack of {n:,}", ["--adapters", str(pack_path)])):
        port = free_port()
        t = time.perf_counter()
        proc = start([sys.executable, "-m", "tinylora", "serve", "--model", args.model, "--served-model-name",
                      "base", "--port", str(port), "--max-batch", str(clients), "--log-level", "warning", *extra], port)
        ready = time.perf_counter() - t
        try:
            import httpx
            page, rss_ready = {}, rss_mb(proc.pid)
            if not extra:
                runs["base model, no adapters loaded"] = asyncio.run(drive(port, plan(lambda i: "base")))
            else:
                for where, params in (("first page", {}), ("a deep page", {"after": f"u{n // 2:07d}"})):
                    t = time.perf_counter()
                    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", params=params, timeout=60)
                    r.raise_for_status()
                    page[where] = (time.perf_counter() - t, len(r.json()["data"]))
                runs["1 adapter for all requests"] = asyncio.run(drive(port, plan(lambda i: "u0000000")))
                runs["a different adapter per request"] = asyncio.run(
                    drive(port, plan(lambda i: f"u{(i * 7919 + 12345) % n:07d}")))
            servers[label] = (ready, rss_ready, rss_mb(proc.pid), page)
        finally:
            stop(proc)

    print(f"\n{args.model}, fp32 on {os.cpu_count()} CPU cores; packs of {n:,} random adapters (u=1, n_tie=16)\n")
    table(["pack", "adapters", "bytes", "bytes per adapter", "v bytes per adapter", "built in s"],
          [[f"{k} fp32 numbers", f"{n:,}", f"{b:,}", f"{b / n:.1f}", f"{4 * k}", f"{s:.1f}"]
           for k, (_, s, b) in sizes.items()])
    print()
    _, base_ready, base_after, _ = servers["no adapters"]
    table(["tinylora serve over", "ready (s, process start to /health)", "RSS when ready MB", "RSS after its runs MB",
           "over no adapters, ready / after MB"],
          [[k, f"{r:.1f}", f"{m0:.0f}", f"{m1:.0f}", f"{m0 - base_ready:+.0f} / {m1 - base_after:+.0f}"]
           for k, (r, m0, m1, _) in servers.items()])
    print()
    pages = servers[f"a pack of {n:,}"][3]
    table(["/v1/models", "seconds", "ids"], [[k, f"{s:.3f}", c] for k, (s, c) in pages.items()])
    print()
    table(["workload", "requests", "tokens", "tok/s", "p50 s", "p99 s"],
          [[k, r["requests"], r["tokens"], f"{r['tok_s']:.1f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}"]
           for k, r in runs.items()])
    one, many = runs["1 adapter for all requests"]["tok_s"], runs["a different adapter per request"]["tok_s"]
    print(f"\n{n:,} adapters: {sizes[13][2] / n:.1f} bytes each at 13 numbers; server ready in "
          f"{servers[f'a pack of {n:,}'][0]:.1f} s; distinct adapters / one adapter throughput {many / one:.2f}")
