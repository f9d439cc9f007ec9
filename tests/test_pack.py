"""Adapter packs: one SQLite file of many adapters; safe under kill -9, damage and wrong adapters."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch
from waiting import HANG_GUARD_S, running, wait_until

from tinylora import AdapterConfig, attach, load_adapter, read_adapter_file, save_adapter
from tinylora.cli.main import main
from tinylora.storage.pack import Pack, is_pack
from tinylora.testing import tiny_model

CONFIG = AdapterConfig(u=2, n_tie=3)


def adapter_files(folder, n, config=CONFIG, arch="qwen2", seed=0):
    model = tiny_model(arch, seed=seed)
    adapter = attach(model, config)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        with torch.no_grad():
            adapter.v.copy_(torch.randn(adapter.v.shape, generator=g) * 0.3)
        paths.append(save_adapter(adapter, folder / f"user{i:03d}.safetensors"))
    return paths


def test_create_list_extract_and_load_as_a_file(tmp_path, ids):
    paths = adapter_files(tmp_path / "files", 5)
    pack = Pack.create(tmp_path / "users.tlpack", [tmp_path / "files"])
    assert is_pack(pack.path) and not is_pack(paths[0])
    assert len(pack) == 5 and pack.names() == [f"user{i:03d}" for i in range(5)]
    assert pack.names(after="user001", limit=2) == ["user002", "user003"]
    out = pack.extract("user003", tmp_path / "out.safetensors")
    assert out.read_bytes() == paths[3].read_bytes()  # the same file, byte for byte
    ref = tiny_model("qwen2")
    load_adapter(ref, paths[3])
    for how in ({"name": "user003"}, {}):
        model = tiny_model("qwen2")
        src = pack.path if how else f"{pack.path}::user003"
        load_adapter(model, src, **how)
        assert torch.equal(model(ids).logits, ref(ids).logits)
    with pytest.raises(ValueError, match="name the adapter"):
        read_adapter_file(pack.path)
    with pytest.raises(KeyError, match="no adapter named 'nobody'"):
        pack.get("nobody")


def test_adapters_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    pack = Pack.create(tmp_path / "p.tlpack", adapter_files(tmp_path / "a", 2))
    other_cfg = adapter_files(tmp_path / "b", 1, config=AdapterConfig(u=2, n_tie=3, seed=9))
    with pytest.raises(ValueError, match=r"config differs: seed=9 \(pack: 0\)"):
        pack.add(other_cfg)
    other_base = adapter_files(tmp_path / "c", 1, seed=5)  # same architecture, other weights
    with pytest.raises(ValueError, match="made for another base model"):
        pack.add(other_base)
    lora = tmp_path / "lora"
    lora.mkdir()
    save_adapter(attach(tiny_model("qwen2"), AdapterConfig(method="lora", r=1)), lora / "l.safetensors")
    with pytest.raises(ValueError, match="packs hold tinylora/lora-xs"):
        Pack.create(tmp_path / "q.tlpack", [lora])
    assert len(pack) == 2 and not (tmp_path / "q.tlpack").exists()


def test_a_damaged_entry_is_refused_by_name_and_the_rest_still_load(tmp_path):
    pack = Pack.create(tmp_path / "p.tlpack", adapter_files(tmp_path / "a", 4))
    raw = sqlite3.connect(str(pack.path))
    blob = bytearray(raw.execute("SELECT v FROM adapters WHERE name = 'user002'").fetchone()[0])
    blob[3] ^= 0x10  # one flipped bit
    raw.execute("UPDATE adapters SET v = ? WHERE name = 'user002'", (bytes(blob),))
    raw.commit()
    raw.close()
    with pytest.raises(ValueError, match="'user002' is damaged"):
        pack.get("user002")
    results = dict(pack.items(batch=3))
    assert isinstance(results["user002"], ValueError)
    assert all(isinstance(results[n], torch.Tensor) for n in ("user000", "user001", "user003"))


def test_remove_replace_and_the_command_line(tmp_path, capsys):
    files = adapter_files(tmp_path / "a", 3)
    p = str(tmp_path / "p.tlpack")
    assert main(["pack", "create", p, str(files[0]), str(files[1])]) == 0
    assert main(["pack", "add", p, str(files[2])]) == 0
    assert main(["pack", "rm", p, "user001"]) == 0
    capsys.readouterr()
    assert main(["pack", "list", p]) == 0
    assert capsys.readouterr().out.split() == ["user000", "user002"]
    assert main(["pack", "info", p, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"] == 2 and info["config"]["u"] == 2
    assert main(["pack", "rm", p, "user001"]) == 2
    assert "no adapter named 'user001'" in capsys.readouterr().err
    assert main(["pack", "create", p, str(files[0])]) == 2  # never overwrites
    assert main(["pack", "extract", p, "user002", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert (tmp_path / "x.safetensors").read_bytes() == files[2].read_bytes()


def test_cost_per_adapter_is_close_to_its_v(tmp_path):
    pack = Pack.create(tmp_path / "p.tlpack", adapter_files(tmp_path / "a", 1))
    n = 20_000
    v = torch.zeros(pack.shape)
    pack.put({f"u{i:07d}": v + i for i in range(n)})
    pack.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    per = pack.path.stat().st_size / n
    assert per < 100 + v.numel() * 4, per  # v bytes plus name, checksum and the B-tree's share


WRITER = textwrap.dedent("""
    import sys, torch
    from tinylora.storage.pack import Pack
    pack = Pack(sys.argv[1])
    i = 0
    while True:
        pack.put({f"w{i:06d}": torch.full(pack.shape, float(i))})   # returns once committed
        print(f"w{i:06d}", flush=True)                               # acknowledged
        i += 1
""")


def test_kill_9_while_writing_loses_nothing_acknowledged(tmp_path):
    pack = Pack.create(tmp_path / "p.tlpack", adapter_files(tmp_path / "a", 1))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(pack.path)], stdout=subprocess.PIPE, text=True)
    acked = []
    reader = Pack(pack.path)  # a reader goes on reading while the writer writes
    while len(acked) < 150:
        acked.append(proc.stdout.readline().strip())
        if len(acked) % 50 == 0:
            assert len(reader) >= len(acked)
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it was writing the next one
    proc.wait()
    acked += [line.strip() for line in proc.stdout if line.strip()]
    after = Pack(pack.path)
    rows = dict(after.items())
    for name in acked:
        assert torch.equal(rows[name], torch.full(after.shape, float(int(name[1:]))))
    assert not [n for n, v in rows.items() if isinstance(v, Exception)]  # nothing half-written


def test_a_server_over_a_pack_serves_it_pages_it_and_keeps_runtime_loads_across_kill_9(tmp_path):
    """`tinylora serve --adapters PACK` as users run it: answers from the pack, lists it a page at a time,
    writes a runtime load into the pack before answering, and serves it again after a kill -9."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    import socket

    from test_serve import PROMPTS, alone, make_adapters, model_and_tokenizer
    model, tok = model_and_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    paths = make_adapters(tmp_path / "a", n=1)  # u=2, n_tie=4
    pack = Pack.create(tmp_path / "users.tlpack", paths)
    v = pack.get("user0")
    pack.put({f"clone{i:04d}": v for i in range(1500)})  # more than one page of /v1/models
    damaged = sqlite3.connect(str(pack.path))
    damaged.execute("UPDATE adapters SET crc = crc + 1 WHERE name = 'clone0007'")
    damaged.commit()
    damaged.close()
    cmd = [sys.executable, "-m", "tinylora", "serve", "--model", str(tmp_path / "base"), "--adapters", str(pack.path),
           "--allow-runtime-adapters", "--log-level", "warning"]

    def start():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        url = f"http://127.0.0.1:{port}/v1"

        def answers():
            try:
                return httpx.get(url + "/models", timeout=HANG_GUARD_S).status_code == 200
            except httpx.HTTPError:  # not listening yet
                return False
        wait_until(answers, running(proc), "the server answers /v1/models",
                   lambda: proc.stdout.read() if proc.poll() is not None else "", poll_s=0.2)
        return proc, url

    def complete(url, name):
        return httpx.post(url + "/completions", json={"model": name, "prompt": PROMPTS[1], "max_tokens": 6,
                                                      "temperature": 0}, timeout=HANG_GUARD_S)

    proc, url = start()
    try:
        first = httpx.get(url + "/models", timeout=HANG_GUARD_S).json()
        assert first["total"] == 1502 and first["has_more"] and len(first["data"]) == 1001
        assert first["data"][0]["id"] == str(tmp_path / "base") and first["data"][1]["id"] == "clone0000"
        rest = httpx.get(url + "/models", params={"after": first["data"][-1]["id"]}, timeout=HANG_GUARD_S).json()
        assert len(rest["data"]) == 501 and not rest["has_more"] and rest["data"][-1]["id"] == "user0"
        expected = alone(paths[0], PROMPTS[1], 6)
        assert complete(url, "clone0042").json()["choices"][0]["text"] == expected
        bad = complete(url, "clone0007")
        assert bad.status_code == 500 and "'clone0007' is damaged" in bad.json()["error"]["message"]
        assert complete(url, "clone0008").status_code == 200  # the rest still serve
        new_v = (v * -1.5).flatten().tolist()
        r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "late", "adapter": {
            "config": {"u": 2, "n_tie": 4}, "v": new_v}}, timeout=HANG_GUARD_S)
        assert r.status_code == 200, r.text
        late = complete(url, "late").json()["choices"][0]["text"]
        assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "clone0001"},
                          timeout=HANG_GUARD_S).status_code == 200
    finally:
        proc.kill()  # kill -9: no shutdown, no flush
        proc.wait()
    after = Pack(pack.path)
    assert "late" in after and "clone0001" not in after and len(after) == 1501
    proc, url = start()
    try:
        assert complete(url, "late").json()["choices"][0]["text"] == late
        assert complete(url, "clone0001").status_code == 404
    finally:
        proc.kill()
        proc.wait()
