import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tinylora.adapter.svd import cached_svd, canonical_signs, truncated_svd


def test_canonical_signs_are_invariant_to_flips():
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    flip = torch.tensor([-1.0, 1.0, -1.0] + [1.0] * 9, dtype=torch.float64)
    a = canonical_signs(U, Vh)
    b = canonical_signs(U * flip, Vh * flip[:, None])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0][a[0].abs().argmax(0), torch.arange(12)] > 0).all()


def test_randomized_matches_full_on_leading_directions():
    # a decaying spectrum, like trained weights (a pure Gaussian matrix has no gap after σ1)
    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(200, 120, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(120, 120, generator=g))
    W = (Q1 * (10.0 / torch.arange(1, 121))) @ Q2.T
    Uf, Sf, Vf = truncated_svd(W, 2, "full")
    Ur, Sr, Vr = truncated_svd(W, 2, "randomized")
    assert torch.allclose(Sf, Sr, rtol=1e-4)
    assert torch.allclose((Uf * Sf) @ Vf.T, (Ur * Sr) @ Vr.T, atol=1e-3)
    assert torch.equal(truncated_svd(W, 2, "randomized")[0], Ur)  # seeded: same every call


def test_cache_returns_identical_factors(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLORA_CACHE", str(tmp_path))
    W = torch.randn(30, 20)
    first = cached_svd(W, 2, "full")
    files = list((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == 1
    second = cached_svd(W, 2, "full")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    files[0].write_bytes(b"garbage")  # a torn cache file is recomputed, not trusted
    assert all(torch.equal(a, b) for a, b in zip(first, cached_svd(W, 2, "full")))


SCRIPT = textwrap.dedent("""
    import sys, torch, hashlib
    torch.set_num_threads(int(sys.argv[1]))
    from tinylora import AdapterConfig, attach
    from tinylora.testing import tiny_model
    model = tiny_model("qwen2", hidden_size=64, intermediate_size=160, num_attention_heads=4)
    adapter = attach(model, AdapterConfig(u=2, n_tie=3, svd=sys.argv[2]), use_cache=False)
    with torch.no_grad():
        for k, p in enumerate(adapter.v):
            p.fill_(0.1 * (k + 1))
    adapter.merge()
    h = hashlib.sha256()
    for t in adapter.targets:
        h.update(model.get_submodule(t.name).weight.detach().numpy().tobytes())
    print(h.hexdigest())
""")


@pytest.mark.slow
def test_merged_weights_identical_across_processes_and_thread_counts(tmp_path):
    env = {**os.environ, "TINYLORA_CACHE": str(tmp_path)}
    for mode in ("full", "randomized"):
        outs = {subprocess.run([sys.executable, "-c", SCRIPT, str(n), mode], env=env, capture_output=True,
                               text=True, check=True).stdout.strip() for n in (1, 2)}
        assert len(outs) == 1, (mode, outs)
