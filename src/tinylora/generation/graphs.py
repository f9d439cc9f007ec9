"""The decode step at fixed shapes, replayed as a CUDA graph (the engine's GPU path).

At decode shapes a GPU is launch-bound: a step of the default model is hundreds of small kernels (three more
per adapted module with per-row adapters), each launched from Python. A CUDA graph records them once and
replays the whole step in one launch. A graph replays fixed shapes at fixed addresses, so the step runs over
buffers that stay put while their graphs live:

- every layer's keys and values in buffers [rows, heads, columns, d] (`kv.SlotLayer` over them: joining,
  leaving and trimming copy within them, as in ordinary buffers), sized for the rows the engine asks for (its
  max_batch) and the columns its batch's rows may reach (prompt + new tokens, a power of two, at least 128),
  and replaced by larger ones (their graphs captured again) when a batch needs more, up to `max_len` columns;
- the step's inputs (each row's token, position, attention mask, s·R) copied into fixed tensors;
- rows and columns rounded up to powers of two, one graph per (rows, columns, adapted) captured when first
  needed, all in one memory pool. Padding rows attend to one column and are ignored; padding columns are
  masked out. Only a context of `max_len` columns or more, or a sliding-window cache, runs the ordinary way.

On a CPU the same fixed-shape step runs eagerly (`capture=False`): the tests check it against
`model.generate`; only the capture itself needs a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from tinylora.adapter.model import attached
from tinylora.generation.kv import SlotLayer, full_attention, in_slots, with_cache
from tinylora.generation.sequence import Sampling

MIN_COLUMNS = 128  # the smallest column bucket


def bucket(n: int, cap: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least), at most cap (n <= cap)."""
    b = least
    while b < n:
        b *= 2
    return min(b, cap)


def check_fixed_steps(model, bank, adapter, hooked) -> None:
    """Refuse, by name, what a fixed-shape step cannot run: a 4D boolean mask is SDPA's form (eager attention
    would add it), dynamic RoPE rescales on a host-side test of the positions, and adapter hooks test v on the
    host every forward, so the step runs the adapter whose hooks run (`hooked`: a bank's, or the engine's own
    unless merged) per row from s·R in a buffer; any other adapter attached to the model is refused."""
    attention = getattr(model.config, "_attn_implementation", None)
    if attention != "sdpa":
        raise ValueError(f"graphs=True needs attn_implementation='sdpa', this model uses {attention!r}")
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    kind = str(rope.get("rope_type", rope.get("type", ""))) if isinstance(rope, dict) else ""
    if "dynamic" in kind:
        raise ValueError(f"graphs=True cannot run {kind!r} RoPE (it rescales on a host-side test)")
    if bank is None and attached(model) not in (None, adapter):
        raise ValueError("graphs=True runs the plain model, a bank's per-row adapters or the engine's own adapter; "
                         "this model has another adapter's hooks attached")
    if bank is None and hooked is not None and not hooked.method.single_v:
        raise ValueError(f"graphs=True runs an adapter's hooks as s·R per row; method {hooked.config.method!r} has "
                         "none (merged weights run it without hooks)")


class FixedStep:
    def __init__(self, model, adapter=None, *, max_len: int, capture: bool):
        """`adapter`: the one whose hooks run (a bank's, or an engine's own), every row with its s·R; None: no
        hooks run (none, or merged into the weights). `max_len`: the most columns the buffers may grow to.
        `capture`: replay CUDA graphs (a CUDA model); False runs the same fixed-shape forward eagerly."""
        self.model, self.adapter, self.capture, self.max_len = model, adapter, capture, max_len
        self.device = next(model.parameters()).device
        self.rows = self.cols = 0  # the buffers' size: allocated for the first batch, grown for a larger one
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: keys, values [S, H, C, d]
        self.col = torch.zeros(1, dtype=torch.long, device=self.device)  # the column this step writes
        self.R: torch.Tensor | None = None  # [S, M, r, r] every row's s·R, once an adapted step needs it
        self.graphs: dict[tuple, tuple | None] = {}  # (rows, columns, adapted) -> (CUDAGraph, its logits)
        self.pool = None

    def slots(self, cache, rows: int, cols: int):
        """The running batch's cache in the fixed buffers, for a batch of at most `rows` rows and `cols` columns:
        at its start, or when a batch that outgrew them fits again (one copy); buffers too small are replaced
        (their graphs dropped). A cache that cannot fit stays in (or moves to) ordinary buffers."""
        first = cache.layers[0]
        n, width = first.keys.shape[0], first.keys.shape[2]
        rows, cols = max(rows, n), min(max(cols, width + 1), self.max_len)
        if self.covers(cache) and rows <= self.rows and cols <= self.cols:
            return cache
        if width >= self.max_len or not full_attention(cache):
            return in_slots(cache)
        with torch.inference_mode(False):  # a server step runs in inference mode; the buffers outlive it
            if rows > self.rows or cols > self.cols:
                self._allocate(cache, max(rows, self.rows), max(bucket(cols, self.max_len, MIN_COLUMNS), self.cols))
            else:  # nothing a previous batch left (stale rows, columns) can reach a masked column as NaN
                for k, v in self.buffers:
                    k.zero_()
                    v.zero_()
        return in_slots(cache, self.buffers)

    def _allocate(self, cache, rows: int, cols: int) -> None:
        """Buffers of `rows` × `cols` for every layer and input; the graphs of the old ones are dropped."""
        self.rows, self.cols = rows, cols
        self.buffers = [tuple(torch.zeros(rows, x.shape[1], cols, x.shape[3], dtype=x.dtype, device=x.device)
                              for x in (layer.keys, layer.values)) for layer in cache.layers]
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # [S, 1]
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # [S, 1]
        self.mask = torch.zeros(rows, 1, 1, cols, dtype=torch.bool, device=self.device)  # [S, 1, 1, C] True: attend
        self.R, self.graphs, self.pool = None, {}, None

    def covers(self, cache) -> bool:
        """Whether the next step of this cache can run at fixed shapes (its layers in the buffers, room for one
        more column)."""
        if self.buffers is None or len(cache.layers) != len(self.buffers):
            return False
        return all(isinstance(layer, SlotLayer) and layer.fixed and layer.kbuf is k and layer.width < self.cols
                   for layer, (k, _) in zip(cache.layers, self.buffers))

    @torch.no_grad()
    def decode(self, cache, tok: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
               R: torch.Tensor | None) -> torch.Tensor:
        """One decode step: tokens [n], the mask with this step's column [n, width], positions [n], and every
        row's s·R [n, M, r, r] (None: no row has an adapter). Returns the logits [n, V]."""
        n, width = mask.shape
        rows, cols = bucket(n, self.rows), bucket(width, self.cols, MIN_COLUMNS)
        self.tok.zero_()
        self.tok[:n, 0] = tok
        self.pos.zero_()
        self.pos[:n, 0] = pos
        self.mask.zero_()
        self.mask[:n, 0, 0, :width] = mask.bool()
        self.mask[n:rows, 0, 0, 0] = True  # padding rows attend to something: no NaN anywhere
        self.col.fill_(width - 1)
        if R is not None:
            if self.R is None:
                with torch.inference_mode(False):
                    self.R = R.new_zeros(self.rows, *R.shape[1:])
            self.R[:n] = R
            self.R[n:rows] = 0
        layers = cache.layers
        for layer in layers:
            layer.step_view = (rows, cols, self.col)
        try:
            key = (rows, cols, R is not None)
            if not self.capture:
                logits = self.forward(cache, *key)
            else:
                if key not in self.graphs:
                    self.graphs[key] = self._capture(cache, key)
                if self.graphs[key] is None:  # its capture failed: this shape runs eagerly
                    logits = self.forward(cache, *key)
                else:
                    graph, logits = self.graphs[key]
                    graph.replay()
        finally:
            for layer in layers:
                layer.step_view = None
        for layer in layers:
            layer.grow(1)
        return logits[:n, -1].clone()  # [n, V]: the graph's output is overwritten by its next replay

    def forward(self, cache, rows: int, cols: int, adapted: bool) -> torch.Tensor:
        """The fixed-shape forward of the inputs in the buffers, run eagerly (what a graph records): [rows, 1, V]."""
        if adapted:
            ctx = self.adapter.per_row(self.R[:rows], cached=False)  # R changes in place between replays
        elif self.adapter is not None:
            ctx = self.adapter.disabled()
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return self.model(input_ids=self.tok[:rows], attention_mask=self.mask[:rows, :, :, :cols],
                              position_ids=self.pos[:rows], **with_cache(self.model, cache)).logits  # [rows, 1, V]

    def _capture(self, cache, key: tuple) -> tuple | None:
        """Record the step for `key` (None if it cannot be captured: it then runs eagerly). The recording runs
        nothing, so the step first runs eagerly on a side stream (writing the same column the replay then
        writes), which also builds what the adapter caches lazily, outside the graph. Capture errors are
        thread-local: a server's request threads may use the GPU meanwhile."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(cache, *key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self.forward(cache, *key)
        except RuntimeError as e:
            warnings.warn(f"decode step {key} (rows, columns, adapted) could not be captured as a CUDA graph; "
                          f"it runs eagerly: {e}", stacklevel=2)
            return None
        self.pool = self.pool or graph.pool()
        return graph, logits


@torch.no_grad()
def warm_up(engine) -> int:
    """Run on an idle `engine`, before any request, every decode shape a batch of up to max_batch rows meets in its
    first columns, with and without per-row adapters, so that their CUDA graphs are recorded now. The rows drain one
    a step, so every row bucket runs; only the graphs and the buffers stay. Returns the decode steps run (0 without
    fixed-shape steps)."""
    if engine.fixed is None:
        return 0
    if not engine.idle:
        raise RuntimeError("warm_up() runs on an idle engine (before the first request)")
    cases = [None]
    if engine.bank is not None:
        cases.append(engine.bank.zeros() + 1e-3)  # any R that is not zero: the adapted shapes
    steps = 0
    with engine.generating():
        for R in cases:
            for i in range(engine.max_batch):  # the first decode runs every row, then row i leaves after i + 2 tokens
                engine.add([engine.pad], Sampling(max_new_tokens=i + 2, temperature=0, ignore_eos=True), R=R)
            while not engine.idle:
                steps += len(engine.step()) > 0
    engine.drop_all()
    return steps
