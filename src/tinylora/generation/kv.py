"""The key/value cache: prompts prefilled once for several rows, and the forward argument that takes a cache."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from transformers.cache_utils import DynamicLayer


@functools.cache
def _cache_arg(model_class: type) -> str:
    """The forward() argument that takes a KV cache: `cache` in newer transformers, `past_key_values` in older."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    return {_cache_arg(type(model)): cache, "use_cache": True}


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, repeats: int = 1):
    """Run left-padded prompts [b, P] once and repeat the result for `repeats` rows each.

    Returns the last position's logits [b·repeats, 1, V], the key/value cache, and the attention mask
    and position ids [b·repeats, P] (positions follow the mask, as in generate()). Under autograd the
    cache keeps its graph, so gradients from every repeat flow back through the one prompt pass.
    """
    run = Prefill(model, ids, mask)
    logits = run.advance()
    return run.result(logits, repeats)


BUCKET_COST = 64  # padded tokens one more forward is worth (it reads every weight again): see length_buckets


class Prefill:
    """Left-padded prompts [b, P] through the model `chunk` columns per `advance()` (None: all at once), so that
    an engine step can take one chunk and the rows already decoding wait one chunk, not the whole prompt.

    `context(rows)`: the context each forward runs in, for these rows (a LongTensor of row indices, or None: all of
    them): the per-row adapters of exactly the rows in that forward. Whole prompts of very different lengths
    without autograd go through in groups of similar length (`length_buckets`): a left-padded batch computes every
    padded column, so a 29-token prompt beside a 50-token one would cost 50 tokens of work."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, chunk: int | None = None, context=None,
                 group_lengths: bool = True):
        from transformers import DynamicCache
        self.model, self.ids, self.mask = model, ids, mask
        self.pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [b, P]
        self.cache = DynamicCache(config=model.config)
        self.chunk = chunk or ids.shape[1]
        self.context = context or (lambda rows: contextlib.nullcontext())
        self.group_lengths = group_lengths  # False: one batch, the summation order rollouts were recorded with
        self.done = 0  # columns through the model so far

    @property
    def finished(self) -> bool:
        return self.done >= self.ids.shape[1]

    def advance(self) -> torch.Tensor:
        """The next chunk's forward; the logits of its last position [b, 1, V]."""
        P = self.ids.shape[1]
        if self.group_lengths and self.done == 0 and self.chunk >= P and not torch.is_grad_enabled() \
                and full_attention(self.cache):
            lengths = self.mask.sum(dim=1).tolist()  # [b] each prompt's tokens
            buckets = length_buckets(lengths)
            if len(buckets) > 1:
                return self._whole_in_buckets(buckets, lengths)
        end = min(self.done + self.chunk, P)
        with self.context(None):
            logits = self._forward(self.ids[:, self.done:end], self.mask[:, :end], self.pos[:, self.done:end],
                                   self.cache)  # [b, 1, V]
        self.done = end
        if not self.finished:  # more chunks to come: write them into buffers instead of concatenating
            self.cache = in_slots(self.cache)
        return logits

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """Columns ids [k, c] (their mask [k, up to and including them], positions [k, c]) through the model into
        `cache`: the logits of the last position [k, 1, V]."""
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(self.model, cache),
                          logits_to_keep=1).logits

    def _whole_in_buckets(self, buckets: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """Every prompt whole, one forward per bucket of rows trimmed to its longest prompt; the buckets' keys and
        values are then written right-aligned into one cache of P columns (zeros where a row has no token, which
        its mask hides), so the result is the one batch's, up to the kernels' summation order."""
        from transformers import DynamicCache
        b, P = self.ids.shape
        logits, merged = None, None  # [b, 1, V]; per layer (keys, values) [b, heads, P, d]
        for bucket in buckets:
            rows = torch.tensor(bucket, device=self.ids.device)  # [k]
            L = max(lengths[i] for i in bucket)  # the bucket's longest prompt
            ids, mask, pos = (x.index_select(0, rows)[:, P - L:] for x in (self.ids, self.mask, self.pos))  # [k, L]
            cache = DynamicCache(config=self.model.config)
            with self.context(rows):
                out = self._forward(ids, mask, pos, cache)  # [k, 1, V]
            if logits is None:
                logits = out.new_zeros(b, *out.shape[1:])
                merged = [(layer.keys.new_zeros(b, layer.keys.shape[1], P, layer.keys.shape[3]),
                           layer.values.new_zeros(b, layer.values.shape[1], P, layer.values.shape[3]))
                          for layer in cache.layers]
            logits[rows] = out
            for (keys, values), layer in zip(merged, cache.layers):
                keys[rows, :, P - L:] = layer.keys  # [k, heads, L, d] into the rows' last L columns
                values[rows, :, P - L:] = layer.values
        self.cache = DynamicCache(config=self.model.config)
        for i, (keys, values) in enumerate(merged):
            self.cache.update(keys, values, i)
        self.done = P
        return logits

    def result(self, logits: torch.Tensor, repeats: int = 1):
        """(logits [b·repeats, 1, V], cache, mask, position ids [b·repeats, P]) once finished."""
        cache, mask, pos = self.cache, self.mask, self.pos
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            logits, mask, pos = (x.repeat_interleave(repeats, dim=0) for x in (logits, mask, pos))  # [b·repeats, ...]
        return logits, cache, mask, pos


def length_buckets(lengths: list[int], cost: int | None = None) -> list[list[int]]:
    """Rows grouped by prompt length so that the tokens computed, padding included, plus `cost` (default
    BUCKET_COST) per forward are fewest: the best split of the sorted lengths into runs, O(b²); one bucket of every
    row when one batch is cheapest."""
    cost = BUCKET_COST if cost is None else cost
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_len = [lengths[i] for i in order]
    n = len(order)
    best = [0] + [None] * n  # best[j]: cheapest cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last bucket: sorted rows i..j-1, as long as row j-1's prompt
            c = best[i] + cost + (j - i) * sorted_len[j - 1]
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    buckets, j = [], n
    while j > 0:
        buckets.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return buckets[::-1]


def cache_layers(cache) -> list:
    """The per-layer key/value tensors of a DynamicCache (full attention only: continuous batching edits them)."""
    layers = cache.layers
    kinds = {type(layer).__name__ for layer in layers}
    if not kinds <= {"DynamicLayer", "SlotLayer"}:
        raise NotImplementedError(f"continuous batching needs full-attention KV caches, this model has {kinds}")
    return layers


class SlotLayer(DynamicLayer):
    """Keys and values in buffers [rows, heads, columns, d] grown by doubling; `keys`/`values` are views of the
    rows and columns in use. A decode step writes one column; only rows joining or leaving, or a change of
    the batch's left edge, copy anything (DynamicLayer concatenates: the whole cache copied every step).

    `buffers` (a fixed-shape decode step, generation/graphs.py): buffers owned by the step, which replaces them
    only between its graphs, so a captured CUDA graph keeps reading the right memory. A layer that must outgrow
    them moves to buffers of its own and stops being `fixed` until the step's buffers are grown to hold it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, buffers: tuple | None = None):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        n, heads, self.width, d = keys.shape
        self.n = n
        self.fixed = buffers is not None
        if buffers is None:
            self.kbuf = keys.new_zeros(n, heads, max(2 * self.width, 64), d)  # [rows, heads, columns, d]
            self.vbuf = torch.zeros_like(self.kbuf)
        else:
            self.kbuf, self.vbuf = buffers
        self._fit(n, self.width)
        self.kbuf[:n, :, :self.width], self.vbuf[:n, :, :self.width] = keys, values
        self.step_view: tuple | None = None  # (rows, columns, column tensor [1]) while a fixed-shape step runs
        self._views()

    def fits(self, rows: int, cols: int) -> bool:
        return rows <= self.kbuf.shape[0] and cols <= self.kbuf.shape[2]

    def _views(self) -> None:
        self.keys = self.kbuf[:self.n, :, :self.width]  # [n, heads, width, d]: views, no copy
        self.values = self.vbuf[:self.n, :, :self.width]

    def _fit(self, rows: int, cols: int) -> None:
        """Buffers of at least `rows` × `cols` (doubling: each element is moved O(1) times on average)."""
        if self.fits(rows, cols):
            return
        self.fixed = False
        R, C = self.kbuf.shape[0], self.kbuf.shape[2]
        R, C = max(rows, R if rows <= R else 2 * R), max(cols, C if cols <= C else 2 * C, 64)
        for name in ("kbuf", "vbuf"):
            old = getattr(self, name)
            new = old.new_zeros(R, old.shape[1], C, old.shape[3])
            new[:self.n, :, :self.width] = old[:self.n, :, :self.width]
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.step_view is not None:  # a fixed-shape step: every row of the view writes column `col`
            rows, cols, col = self.step_view
            keys, values = self.kbuf[:rows, :, :cols], self.vbuf[:rows, :, :cols]  # [rows, heads, cols, d]
            keys.index_copy_(2, col, key_states)  # col [1]: a tensor, so a captured graph reads it each replay
            values.index_copy_(2, col, value_states)
            return keys, values
        q = key_states.shape[2]  # [n, heads, q, d]: the new columns of every running row
        self._fit(self.n, self.width + q)
        self.kbuf[:self.n, :, self.width:self.width + q] = key_states
        self.vbuf[:self.n, :, self.width:self.width + q] = value_states
        self.width += q
        self._views()
        return self.keys, self.values

    def grow(self, q: int = 1) -> None:
        """`q` columns written by fixed-shape steps (update under step_view) now belong to the running rows."""
        self.width += q
        self._views()

    def clear_rows(self, rows: torch.Tensor) -> None:
        """Zero these rows' keys and values (non-finite ones would poison a fixed-shape step's masked columns)."""
        self.kbuf[rows] = 0
        self.vbuf[rows] = 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        m = len(indices)
        self._fit(m, self.width)
        for buf in (self.kbuf, self.vbuf):
            buf[:m, :, :self.width] = buf[indices, :, :self.width]  # gathered first, then written
        self.n = m
        self._views()

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows [m, heads, L, d] joining the batch (L <= width), right-aligned with it, zeros before them."""
        m, L = keys.shape[0], keys.shape[2]
        self._fit(self.n + m, self.width)
        for buf, x in ((self.kbuf, keys), (self.vbuf, values)):
            buf[self.n:self.n + m, :, :self.width - L] = 0
            buf[self.n:self.n + m, :, self.width - L:self.width] = x
        self.n += m
        self._views()

    def shift(self, cols: int) -> None:
        """Every row moved `cols` columns right (cols > 0: room on the left for a longer joining prompt) or
        left (cols < 0: drop columns no row attends to any more)."""
        new_width = self.width + cols
        self._fit(self.n, new_width)
        for buf in (self.kbuf, self.vbuf):
            if cols > 0:
                buf[:self.n, :, cols:new_width] = buf[:self.n, :, :self.width].clone()
                buf[:self.n, :, :cols] = 0
            else:
                buf[:self.n, :, :new_width] = buf[:self.n, :, -cols:self.width].clone()
        self.width = new_width
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a running batch's cache is trimmed by shift(), not cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.n, device=self.kbuf.device).repeat_interleave(repeats))


def full_attention(cache) -> bool:
    """Whether every layer attends to the whole context (no sliding window): a prefill's DynamicLayers, or
    SlotLayers (a chunked prefill's, or a running batch's)."""
    return all(type(layer) in (DynamicLayer, SlotLayer) for layer in cache.layers)


def in_slots(cache, buffers: list[tuple] | None = None):
    """The running batch's cache: every layer's keys and values moved into buffers allocated ahead (SlotLayer),
    so a decode step writes its column in place instead of copying the whole cache. A model with sliding-window
    layers keeps its own cache (and its batch admits no rows while it runs: see cache_layers).
    `buffers`: one fixed (keys, values) pair per layer to move into instead (generation/graphs.py)."""
    if not full_attention(cache):  # sliding windows: left as they are
        return cache
    if buffers is None:
        cache.layers = [layer if isinstance(layer, SlotLayer) else SlotLayer(layer.keys, layer.values)
                        for layer in cache.layers]
    else:
        cache.layers = [SlotLayer(layer.keys, layer.values, b) for layer, b in zip(cache.layers, buffers)]
    return cache


def join_rows(cache, new) -> None:
    """Append the rows of the prefilled cache `new` (no wider than `cache`: see shift_columns) to `cache`."""
    for mine, theirs in zip(cache_layers(cache), cache_layers(new)):
        mine.add_rows(theirs.keys, theirs.values)


def shift_columns(cache, cols: int) -> None:
    for layer in cache_layers(cache):
        layer.shift(cols)
