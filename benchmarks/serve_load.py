"""`bench.py serve`: `tinylora serve` under 32 concurrent clients, against a PEFT set_adapter server.

Both servers run as their own processes (the real CLI for ours); one asyncio client process drives them
with `--clients` closed-loop clients, each sending its requests one after another. Greedy completions of
exactly `--new-tokens` tokens (`ignore_eos`: equal work whatever the adapter) for arithmetic chat prompts
of the default task. Reported: completion tokens/s over
the whole run and p50/p99 request latency, for
  - the base model, one adapter for every request, a different adapter for every request (of 1,000
    loaded), the same adapters sent inline in each request;
  - the PEFT baseline: the same adapters exported as exact rank-2 LoRA, `set_adapter` per request.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import table

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.export import export_peft
from tinylora.generation.bank import AdapterBank
from tinylora.io import read_adapter_file
from tinylora.models import load_model
from tinylora.tasks.prompts import chat_prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, timeout: float = 600) -> subprocess.Popen:
    import httpx
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not come up")


def start_tinylora(model: str, adapters: Path, clients: int, dtype: str = "fp32") -> tuple[subprocess.Popen, int]:
    """`tinylora serve` of `model` (served as "base") and the adapters in a folder, a row per client."""
    port = free_port()
    return start([sys.executable, "-m", "tinylora", "serve", "--model", model, "--served-model-name", "base",
                  "--adapters", str(adapters), "--port", str(port), "--max-batch", str(clients), "--dtype", dtype,
                  "--log-level", "warning"], port), port


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def drive(port: int, bodies: list[list[dict]]) -> dict:
    """bodies[c] = client c's requests, sent one after another; all clients at once."""
    import httpx
    latencies, tokens = [], 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=3600,
                                 limits=httpx.Limits(max_connections=len(bodies) + 4)) as http:
        r = await http.post("/completions", json={**bodies[0][0], "max_tokens": 2})  # warm-up
        r.raise_for_status()

        async def client(mine):
            nonlocal tokens
            for body in mine:
                t = time.perf_counter()
                r = await http.post("/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(client(m) for m in bodies))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "p50": statistics.median(latencies), "p99": q[98]}


def write_adapters(model, folder: Path, n: int, peft_folder: Path, n_peft: int) -> int:
    """`n` adapters of the paper's size (u=1, n_tie=16) as folder/aNNNN.safetensors, random v at the scale trained
    ones reach, the first `n_peft` also exported as PEFT LoRA to peft_folder/aNNNN; returns their size."""
    adapter = attach(model, AdapterConfig(u=1, n_tie=16), progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in range(n):
            adapter.v.copy_(torch.randn(adapter.v.shape, generator=gen) * 0.05)
            save_adapter(adapter, folder / f"a{k:04d}.safetensors")
            if k < n_peft:
                export_peft(adapter, peft_folder / f"a{k:04d}")
    n_numbers = adapter.num_trainable()
    adapter.detach()
    return n_numbers


def bench_serve(args) -> None:
    if args.peer == "llama-server":
        from serve_peer import bench_serve_peer
        return bench_serve_peer(args)
    clients, per_client, new = args.clients, args.requests_per_client, args.new_tokens
    work = Path(tempfile.mkdtemp(prefix="tinylora-serve-bench-"))
    model, tok = load_model(args.model, "fp32", "cpu")
    from tinylora.api import DataConfig
    questions = [p.question for p in DataConfig().problems("test", clients * per_client)]
    prompts = chat_prompts(tok, questions)
    ours, peft = work / "ours", work / "peft"
    n_numbers = write_adapters(model, ours, args.adapters, peft, clients)
    t = time.perf_counter()
    bank = AdapterBank(model, sorted(ours.glob("*.safetensors")), progress=False)
    load_s = time.perf_counter() - t
    bank.adapter.detach()
    del model, bank

    def plan(model_of, inline=False) -> list[list[dict]]:
        out = []
        for c in range(clients):
            mine = []
            for j in range(per_client):
                i = c * per_client + j
                body = {"model": model_of(i, c), "prompt": prompts[i], "max_tokens": new, "temperature": 0,
                        "ignore_eos": True}
                if inline:
                    config, _, tensors = read_adapter_file(ours / f"{body['model']}.safetensors")
                    inline = {"config": json.loads(config.to_json()), "v": tensors["v"].tolist()}
                    body = {**body, "model": "base", "adapter": inline}
                mine.append(body)
            out.append(mine)
        return out

    distinct = lambda i, c: f"a{(i * 7919) % args.adapters:04d}"  # noqa: E731 (a different adapter each request)
    runs = {"base model (no adapter)": plan(lambda i, c: "base"),
            "1 adapter for all requests": plan(lambda i, c: "a0000"),
            f"a different adapter per request (of {args.adapters:,} loaded)": plan(distinct),
            "the same, sent inline in each request": plan(distinct, inline=True)}
    results = {}
    proc, port = start_tinylora(args.model, ours, clients)
    try:
        for name, bodies in runs.items():
            results[f"tinylora serve: {name}"] = asyncio.run(drive(port, bodies))
    finally:
        stop(proc)
    port = free_port()
    proc = start([sys.executable, str(Path(__file__).with_name("peft_server.py")), "--model", args.model,
                  "--adapters", str(peft), "--port", str(port)], port)
    try:  # one request per client: it serves one request at a time
        bodies = [[{"model": f"a{c:04d}", "prompt": prompts[c * per_client], "max_tokens": new, "temperature": 0,
                    "ignore_eos": True}] for c in range(clients)]
        results[f"PEFT set_adapter per request ({clients} adapters)"] = asyncio.run(drive(port, bodies))
    finally:
        stop(proc)

    print(f"\n{args.model}, fp32 on {os.cpu_count()} CPU cores; {clients} concurrent clients, greedy, {new} new "
          f"tokens per request; adapters of {n_numbers} numbers (u=1, n_tie=16)\n")
    table(["server and workload", "requests", "tokens", "tok/s", "p50 s", "p99 s"],
          [[k, r["requests"], r["tokens"], f"{r['tok_s']:.1f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}"]
           for k, r in results.items()])
    keys = list(results)
    one, many, inline, peft_r = (results[k]["tok_s"] for k in keys[1:5])
    print(f"\n{args.adapters:,} adapter files validated and loaded in {load_s:.1f} s")
    print(f"throughput ratios: distinct adapters / one adapter {many / one:.2f}; inline / loaded {inline / many:.2f}; "
          f"tinylora (distinct adapters) / PEFT set_adapter {many / peft_r:.1f}x")


def bench_engine(args) -> None:
    """The engine alone (no HTTP): 64 rows decoding together with no adapter, one adapter (its hooks, or a bank
    row), or a different adapter per row (of 1,000 in the bank), on a random-weight model of the default shape.
    `--graphs`: each also with fixed-shape steps (CUDA graphs on a GPU), side by side."""
    from common import median_time, random_model

    from tinylora.generation.engine import Engine
    from tinylora.testing import tiny_tokenizer
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows, new = args.gen_batch, args.new_tokens
    model = random_model(layers=args.layers).to(device, dtype)
    tok = tiny_tokenizer()  # only for its pad/eos ids: the prompts are random token ids
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 100_000, (rows, 32), generator=gen).tolist()
    weights = "hooks" if device != "cpu" else "auto"
    modes = [False, True] if args.graphs else [False]

    def run(engine, R_of_row):
        _greedy_rows(engine, prompts, [R_of_row(i) for i in range(rows)], new)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    results = {}  # (case, graphs) -> seconds
    plain = "no bank: the plain model"
    for graphs in modes:  # before the bank attaches its hooks to the model
        engine = Engine(model, tok, weights=weights, max_batch=rows, graphs=graphs)
        results[plain, graphs] = median_time(lambda e=engine: run(e, lambda i: None), args.reps)
        del engine  # its fixed KV buffers
    one = "no bank: one adapter's hooks (a training run's rollouts)"
    adapter = attach(model, AdapterConfig(u=1, n_tie=16), progress=False)
    with torch.no_grad():
        adapter.v.copy_(torch.randn(adapter.v.shape, generator=gen) * 0.05)
    for graphs in modes:
        engine = Engine(model, tok, adapter=adapter, weights=weights, max_batch=rows, graphs=graphs)
        results[one, graphs] = median_time(lambda e=engine: run(e, lambda i: None), args.reps)
        del engine
    adapter.detach()
    bank = AdapterBank(model, config=AdapterConfig(u=1, n_tie=16), progress=False)
    n_groups = len(bank.adapter.groups)
    for k in range(args.adapters):
        bank.add(f"a{k}", bank.config, torch.randn(n_groups, 1, generator=gen) * 0.05)
    R = [bank.get(f"a{(i * 7919) % args.adapters}") for i in range(rows)]
    cases = [("bank: every row the base (R = 0)", lambda i: None),
             ("bank: one adapter for every row", lambda i: R[0]),
             (f"bank: a different adapter per row (of {args.adapters:,})", lambda i: R[i])]
    tokens = {}  # graphs -> the distinct adapters' greedy tokens (the two modes must agree)
    for graphs in modes:
        engine = Engine(model, tok, bank=bank, weights=weights, max_batch=rows, graphs=graphs)
        for name, R_of_row in cases:
            results[name, graphs] = median_time(lambda e=engine, f=R_of_row: run(e, f), args.reps)
        tokens[graphs] = [s.tokens for s in _greedy_rows(engine, prompts, R, new)]
        del engine
    cases = [(plain, None), (one, None), *cases]
    print(f"\nrandom weights of the default model's shape ({args.layers} layers), {dtype} on {device}; {rows} rows x "
          f"{new} new tokens, greedy, median of {args.reps}\n")
    head = ["rows run", "seconds", "tokens/s"] + (["fixed-shape steps: seconds", "tokens/s"] if args.graphs else [])
    cells = {k: (f"{t:.3f}", f"{rows * new / t:.0f}") for k, t in results.items()}
    table(head, [[name] + [x for g in modes for x in cells[name, g]] for name, *_ in cases])
    for g in modes:
        t = [results[name, g] for name, *_ in cases]
        print(f"\n{'fixed-shape steps' if g else 'ordinary steps'}: distinct / one adapter: {t[3] / t[4]:.2f}x the "
              f"throughput; per-row adapters / plain model: {t[0] / t[4]:.2f}x; one adapter's hooks / plain model: "
              f"{t[0] / t[1]:.2f}x")
    if args.graphs:
        speedup = results[plain, False] / results[plain, True]
        same = sum(a == b for x, y in zip(tokens[False], tokens[True]) for a, b in zip(x, y))
        print(f"fixed-shape / ordinary, plain model: {speedup:.2f}x the throughput; distinct adapters' greedy tokens "
              f"equal in both modes: {same} of {rows * new}")


def _greedy_rows(engine, prompts, R, new):
    """Every prompt with its row's adapter through `engine`, greedy: the rows, in order."""
    from tinylora.generation.engine import Sampling
    rows = []
    with engine.generating():
        for p, r in zip(prompts, R):
            rows += engine.add(p, Sampling(max_new_tokens=new, temperature=0), R=r)
        while not engine.idle:
            engine.step()
    return rows
