"""SVD start-up (issue #4, benchmark 5): cold vs cached, full vs randomized, and 7B-shaped matrices.

The default model's 168 weights are decomposed for real. For Qwen2.5-7B one matrix of each of its
four weight shapes is timed on random Gaussian data and the total is extrapolated to its 196 weights
(28 layers × q, k, v, o, gate, up, down): an estimate, not a measurement of the real 7B.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from common import table

from tinylora import AdapterConfig, attach
from tinylora.adapter.svd import truncated_svd

QWEN7B_SHAPES = {  # (out, in): modules per layer
    (3584, 3584): 2,  # q_proj, o_proj
    (512, 3584): 2,  # k_proj, v_proj
    (18944, 3584): 2,  # gate_proj, up_proj
    (3584, 18944): 1,  # down_proj
}
LAYERS_7B = 28


def excess_residual(W: torch.Tensor, ref, got) -> float:
    """‖W − W_r(got)‖ / ‖W − W_r(ref)‖ − 1 for two (U, S, V) rank-r truncations of W: how much more of W the
    randomized truncation leaves out than the optimal one (0: as good). Comparing the two truncations
    directly says nothing where the top singular values nearly tie (Gaussian matrices): the rank-r
    subspace is then ill-defined, and two equally good approximations can differ completely."""
    W = W.detach().double()
    res = [(W - (U.double() * S.double()) @ V.double().T).norm() for U, S, V in (ref, got)]
    return float(res[1] / res[0] - 1)


def bench_svd(args) -> None:
    from tinylora.models import load_model
    model, _ = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TINYLORA_CACHE"] = cache
        for mode in ("full", "randomized"):
            t = time.perf_counter()
            attach(model, AdapterConfig(svd=mode), progress=False).detach()
            cold = time.perf_counter() - t
            t = time.perf_counter()
            attach(model, AdapterConfig(svd=mode), progress=False).detach()
            rows.append([f"default model, 168 weights, {mode}", f"{cold:.1f}", f"{time.perf_counter() - t:.2f}"])
    errs = [excess_residual(m.weight, truncated_svd(m.weight, 2, "full"), truncated_svd(m.weight, 2, "randomized"))
            for n, m in model.named_modules()
            if n.endswith(("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.12.mlp.up_proj",
                           "layers.23.self_attn.k_proj"))]
    print("cold = first start (SVD computed, cache written); cached = second start (cache read)\n")
    table(["weights", "cold (s)", "cached (s)"], rows)
    print(f"\nrandomized vs full rank-2 truncation on 4 real weights: excess residual max {max(errs):.1e}\n")

    g = torch.Generator().manual_seed(0)
    est = {"full": 0.0, "randomized": 0.0}
    shape_rows = []
    for (out_f, in_f), per_layer in QWEN7B_SHAPES.items():
        W = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        times, factors = {}, {}
        for mode in ("full", "randomized"):
            t = time.perf_counter()
            factors[mode] = truncated_svd(W, 2, mode)
            times[mode] = time.perf_counter() - t
            est[mode] += times[mode] * per_layer * LAYERS_7B
        excess = excess_residual(W, factors["full"], factors["randomized"])
        shape_rows.append([f"{out_f} x {in_f}", per_layer * LAYERS_7B, f"{times['full']:.2f}",
                           f"{times['randomized']:.2f}", f"{excess:.1e}"])
    print("Qwen2.5-7B shapes, one random matrix each, float64:\n")
    table(["shape", "weights in 7B", "full (s)", "randomized (s)", "excess residual"], shape_rows)
    print(f"\nextrapolated cold start for Qwen2.5-7B's 196 weights: full {est['full'] / 60:.1f} min, randomized "
          f"{est['randomized'] / 60:.1f} min (speed-up {est['full'] / est['randomized']:.0f}x)")
