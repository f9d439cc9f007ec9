"""The generation engine: the one place where tinylora generates (rollouts, evaluation, the server).

It owns the model, the weights it generates with (a packed/int8 copy, hooks, or the adapter merged in:
`cpu_weights`) and, with an AdapterBank, one adapter per row. Rows are Sequences that join and leave a
running batch between decode steps (continuous batching):

    engine.add(prompt_ids, Sampling(...))   # queue a request (n rows sharing one prefill)
    engine.step()                           # admit waiting rows, pick one token for every row, retire
                                            # finished ones; returns the rows that got a token

The running batch's KV cache lives in buffers allocated ahead (`kv.in_slots`): a decode step writes one
column in place, so its cost is the attention's own, not a copy of the whole cache. Joining rows are
written right-aligned into free rows (positions follow each row's own mask, so padding changes nothing but
memory); leaving compacts the rows and, for long-lived batches, trims columns that no row attends to any
more: only joins and departures copy. While rows decode, joining prompts go through the model one
`prefill_chunk` of columns per step, so a long prompt delays the running rows by a chunk, not its whole
prefill; through the step API (the server), whole prompts of very different lengths go through in groups of
similar length instead of one batch padded to the longest (kv.length_buckets). With a bank, only rows that
have an adapter cost adapter work (a zero R adds nothing).
With `graphs`, decode steps run at fixed shapes over buffers sized to the batch, replayed as CUDA graphs on a
GPU (generation/graphs.py).

Sampling draws exactly from softmax(logits / T) (optionally top-p), by inverse CDF from one uniform per row:
inside `generate` (rollouts) from seeded streams, one for the whole call or one per run sharing the batch
(each stream's rows draw what they would alone), or from each row's own seeded generator (server requests),
so a request's tokens do not depend on its neighbours. Backends that generate elsewhere (vLLM fed the exact
LoRA export) would replace `step`; everything else talks to `add`/`step`/`cancel` or `generate`.
"""

from __future__ import annotations

import collections
import contextlib
import os

import torch
from torch.nn import functional as F

from tinylora.generation import weights as cpu_weights
from tinylora.generation.batch import Rollout, eos_ids, rollout_of
from tinylora.generation.cpu_kernels import contiguous_head, folded_decode
from tinylora.generation.graphs import FixedStep, check_fixed_steps, warm_up
from tinylora.generation.kv import Prefill, SlotLayer, in_slots, join_rows, shift_columns, with_cache
from tinylora.generation.row_adapters import RowAdapters
from tinylora.generation.sampling import pick_tokens
from tinylora.generation.sequence import Sampling, Sequence


class Engine:
    def __init__(self, model, tokenizer, *, weights="auto", adapter=None, exact: bool = False, bank=None,
                 max_batch: int = 64, prefill_chunk: int | None = 256, graphs: bool = False, max_len: int = 4096):
        """`weights`: a GenerationWeights, or a choice for `cpu_weights.for_generation` ('auto', 'packed',
        'merged', 'hooks', 'int8'; `exact`: a merge is undone bit for bit).
        `bank`: an AdapterBank; every row then runs its own adapter (Sequence.R), the base where it has none.
        `prefill_chunk`: while rows are decoding, joining prompts go through the model this many columns per
        step (None: whole), so a long prompt delays each running row's next token by one chunk's forward.
        `graphs`: decode steps at fixed shapes over KV buffers sized to the batch (max_batch rows, the columns
        its rows may reach, at most `max_len`), replayed as CUDA graphs on a GPU (generation/graphs.py; on a CPU
        the same steps run eagerly). Buffers too small are grown; a context of `max_len` columns or more runs
        the ordinary way.
        """
        self.model, self.tokenizer = model, tokenizer
        self.bank = bank
        self.adapter = bank.adapter if bank is not None else adapter
        if isinstance(weights, str):
            trains_base = self.adapter is not None and self.adapter.method.trains_base
            weights = cpu_weights.for_generation(model, weights, trains_base=trains_base, exact=exact)
        if bank is not None and isinstance(weights, cpu_weights.Merged):  # a merge gives every row one adapter
            weights = cpu_weights.AdapterHooks()
        self.weights = weights
        self.device = next(model.parameters()).device
        self.eos = set(eos_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.compact = True  # trim KV columns no row attends to (off inside `generate`: bit-for-bit rollouts)
        self.waiting: collections.deque[list[Sequence]] = collections.deque()  # groups sharing one prefill
        self.shared: list[torch.Generator] | None = None  # inside `generate`: the seeded streams rows draw from
        self._generating = False
        self.joining = None  # (groups, Prefill, R) of rows whose prompts are part way through the model
        self.adapters = RowAdapters(bank, self.adapter)
        self.fixed = None
        if graphs:
            hooked = None if isinstance(weights, cpu_weights.Merged) else self.adapter  # a merge leaves no hooks
            check_fixed_steps(model, bank, self.adapter, hooked)
            self.fixed = FixedStep(model, hooked, max_len=max_len, capture=self.device.type == "cuda")
        self.reset()

    def drop_all(self) -> None:
        """Forget every row: running, part way through its prefill, and waiting."""
        self.waiting.clear()
        self.joining = None
        self.reset()

    def reset(self) -> None:
        """Drop every running row and the KV cache (rows waiting or part way through their prefill stay)."""
        self.running: list[Sequence] = []
        self.cache = None
        self.mask = self.next_pos = self.logits = self.row_R = None  # [n, L], [n], [n, V], [n, M, r, r]
        self.adapters.forget()

    @contextlib.contextmanager
    def generating(self):
        """The weights context every step runs in: enter it once around many steps (re-entering is a no-op)."""
        if self._generating:
            yield
            return
        self._generating = True
        try:
            with self.weights.generating(None if self.bank is not None else self.adapter), \
                    contiguous_head(self.model):
                yield
        finally:
            self._generating = False

    @property
    def captures_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (graphs=True on a GPU), which `warm_up` can record ahead."""
        return self.fixed is not None and self.fixed.capture

    def warm_up(self) -> int:
        """Record every decode graph a batch of up to max_batch rows meets, before the first request (a server's
        start) rather than inside the first requests: see graphs.warm_up. Returns the decode steps run."""
        return warm_up(self)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.joining is None

    def live(self) -> list[Sequence]:
        """Every row not yet retired: running, part way through its prefill, or waiting."""
        joining = [s for g in self.joining[0] for s in g] if self.joining is not None else []
        return [*self.running, *joining, *(s for g in self.waiting for s in g)]

    # ---- the step API -------------------------------------------------------------------------
    def add(self, prompt_ids: list[int], sampling: Sampling, *, R: torch.Tensor | None = None,
            n: int = 1) -> list[Sequence]:
        """Queue `n` rows for one prompt (prefilled once); they join the batch at the next step."""
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={sampling.max_new_tokens}: expected >= 1")
        seqs = []
        for j in range(n):
            s = Sequence(list(prompt_ids), sampling, R)
            if sampling.seed is not None:  # n rows of one seeded request: seed, seed + 1, ...
                s.generator = torch.Generator().manual_seed((sampling.seed + j) % 2 ** 64)
            seqs.append(s)
        self.waiting.append(seqs)
        return seqs

    def cancel(self, seq: Sequence, reason: str = "abort") -> None:
        """End a row (a stop string, a client that left): it leaves the batch at the next step."""
        if not seq.done:
            seq.finish_reason = reason

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """Admit waiting rows, choose one token for every running row, retire the finished ones.
        Returns the rows that got a token this step (finished ones included)."""
        self._retire()  # rows cancelled since the last step
        self._admit()
        self._retire()  # rows cancelled while their prompt went through the model, now joined
        if not self.running:
            return []
        # One pass over the logits [n, V] for both the check and greedy's token: NaN and +inf reach the max, and a
        # finite max is all softmax needs (a -inf entry only has probability 0). Ties: the lowest id, as argmax.
        top, best = self.logits.max(dim=-1)  # [n], [n]
        finite = torch.isfinite(top)  # [n]
        if not bool(finite.all()):  # an adapter with extreme values: fail those rows, not the batch
            if self.shared is not None:
                raise FloatingPointError("the model produced non-finite logits (diverged weights or adapter?)")
            bad = (~finite).nonzero().flatten()
            if self.fixed is not None:  # their keys and values must not reach a later row's masked columns
                for layer in self.cache.layers:
                    if isinstance(layer, SlotLayer):
                        layer.clear_rows(bad)
            for i in bad.tolist():
                self.running[i].finish_reason = "error"
            self._retire()
            if not self.running:
                return []
            best = self.logits.max(dim=-1).indices  # [n] of the rows left
        tok, logp = pick_tokens(self.logits, self.running, self.shared, best)  # [n], [n] or None
        toks, lps = tok.tolist(), (logp.tolist() if logp is not None else None)
        for i, s in enumerate(self.running):
            s.tokens.append(toks[i])
            if lps is not None:
                s.logprobs.append(lps[i])
            if (toks[i] in self.eos and not s.sampling.ignore_eos) or toks[i] in s.sampling.stop_token_ids:
                s.finish_reason = "stop"
            elif len(s.tokens) >= s.sampling.max_new_tokens:
                s.finish_reason = "length"
        stepped = list(self.running)
        keep = self._retire()
        if self.running:
            self._decode(tok[keep] if keep is not None else tok)
        return stepped

    # ---- the batch API (rollouts, evaluation) ----------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 seed: int | list[int] = 0, with_logprobs: bool = True, repeats: int = 1, adapters=None,
                 streams: list[int] | None = None) -> Rollout:
        """`repeats` completions per prompt, rows ordered prompt by prompt; same seed, same output.
        `adapters` (bank engines): one name per prompt, None for the base.
        `streams` (one per prompt) with `seed` a list (one per stream): the rows of each stream draw their
        uniforms from that stream alone, exactly as a call with only those prompts and that seed would, so
        several runs share one batch and each samples what it would have sampled alone."""
        if not self.idle:
            raise RuntimeError("generate() needs an idle engine (it is serving rows)")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        streams = [0] * len(prompts) if streams is None else list(streams)
        if len(streams) != len(prompts) or not all(0 <= k < len(seeds) for k in streams):
            raise ValueError(f"streams: one index into the {len(seeds)} seeds per prompt, got {streams}")
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature)
        Rs = self.bank.stack(adapters) if adapters is not None else [None] * len(ids)
        groups = [self.add(x, sampling, R=R, n=repeats) for x, R in zip(ids, Rs)]
        for g, k in zip(groups, streams):
            for s in g:
                s.stream = k
        self.shared = [torch.Generator(device=self.device).manual_seed(x) for x in seeds]
        self.compact, limit, self.max_batch = False, self.max_batch, len(ids) * repeats
        try:
            with self.generating():
                while not self.idle:
                    self.step()
        finally:
            self.compact, self.max_batch, self.shared = True, limit, None
            self.drop_all()
        seqs = [s for g in groups for s in g]
        return rollout_of(seqs, self.tokenizer, self.pad, self.eos, with_logprobs and not greedy).to(self.device)

    # ---- inside a step -------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start prefilling waiting groups (or go on with those part way through); join them once done. While a
        long prompt goes through in chunks, waiting prompts no longer than a chunk are prefilled whole beside it,
        so they do not queue behind it."""
        if any(s.done for g in self.waiting for s in g):  # rows cancelled while waiting leave now
            kept = ([s for s in g if not s.done] for g in self.waiting)
            self.waiting = collections.deque(g for g in kept if g)
        if self.joining is not None and all(s.done for g in self.joining[0] for s in g):
            self.joining = None  # every row it was for has been cancelled
        if self.joining is None:
            groups = self._take_waiting()
            if groups:  # nobody waits on an idle engine: whole prompts then
                self.joining = self._prefill(groups, self.prefill_chunk if self.running else None)
        elif self.prefill_chunk:
            short = self._take_waiting(longest=self.prefill_chunk)
            if short:
                self._advance(self._prefill(short, None))
        if self.joining is not None and self._advance(self.joining):
            self.joining = None

    def _prefill(self, groups: list[list[Sequence]], chunk: int | None) -> tuple:
        """(groups, Prefill of their left-padded prompts, their R [b, M, r, r] or None)."""
        P = max(len(g[0].prompt) for g in groups)
        ids = torch.full((len(groups), P), self.pad, dtype=torch.long)  # [b, P] left-padded
        mask = torch.zeros(len(groups), P, dtype=torch.long)  # [b, P]
        for i, g in enumerate(groups):
            ids[i, P - len(g[0].prompt):] = torch.tensor(g[0].prompt)
            mask[i, P - len(g[0].prompt):] = 1
        R = self.adapters.stack([g[0].R for g in groups])  # [b, M, r, r] or None

        def context(rows):  # the adapters of the rows in one forward (all of them, or a bucket of lengths)
            return self.adapters.context(R if R is None or rows is None else R.index_select(0, rows))
        # `generate` (rollouts, evaluation) keeps one batch: grouping changes the summation order, and with it a
        # training run's trajectory and result
        return groups, Prefill(self.model, ids.to(self.device), mask.to(self.device), chunk, context,
                               group_lengths=self.shared is None), R

    def _advance(self, joining: tuple) -> bool:
        """One chunk of a prefill (all of it once no row is decoding); joins its rows when it is through.
        Returns whether it is done (joined, or failed)."""
        groups, run, R = joining
        sizes = [len(g) for g in groups]
        repeats = sizes[0] if len(set(sizes)) == 1 else 1  # one size: the cache's own repeat, as in training
        try:
            logits = run.advance()  # [b, 1, V]
            while not run.finished and not self.running:  # the rows it was sparing have all left
                logits = run.advance()
            if not run.finished:
                return False
            logits, cache, mask, pos = run.result(logits, repeats)  # [b·k, 1, V], ..., [b·k, P]
        except (RuntimeError, MemoryError):  # e.g. out of memory: these rows fail, the running batch goes on
            if self.shared is not None:  # a `generate` call: its caller should see the error
                raise
            for g in groups:
                for s in g:
                    s.finish_reason = s.finish_reason or "error"
            return True
        if repeats == 1 and max(sizes) > 1:
            idx = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes))
            cache.batch_select_indices(idx.to(self.device))
            logits, mask, pos = logits[idx], mask[idx], pos[idx]
        if R is not None:
            R = R.repeat_interleave(torch.tensor(sizes, device=R.device), dim=0)  # [n_new, M, r, r]
        new = [s for g in groups for s in g]
        if self.shared is None:
            for s in new:  # every server row samples from its own stream
                s.generator = s.generator or torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
        state = (cache, mask, pos[:, -1] + 1, logits[:, -1], R)  # next_pos [n], logits [n, V]
        if not self.running:
            self.running = new
            self.cache, self.mask, self.next_pos, self.logits, self.row_R = state
            self.cache = self._fixed_slots() if self.fixed is not None else in_slots(self.cache)
        else:
            self._join(new, *state)
        return True

    def _take_waiting(self, longest: int | None = None) -> list[list[Sequence]]:
        """The waiting groups, in order, that fit in the batch now beside the rows running or joining (always the
        first one into an empty batch); `longest`: only while their prompts are no longer than this."""
        joining = sum(len(g) for g in self.joining[0]) if self.joining is not None else 0
        room = self.max_batch - len(self.running) - joining
        groups = []
        while self.waiting and (len(self.waiting[0]) <= room or not (self.running or joining or groups)):
            if longest is not None and len(self.waiting[0][0].prompt) > longest:
                break
            g = self.waiting.popleft()
            groups.append(g)
            room -= len(g)
        return groups

    def _join(self, new, cache, mask, next_pos, logits, R) -> None:
        """Append admitted rows to the running batch, left-padding whichever KV cache is shorter."""
        self._trim()
        gap = self.mask.shape[1] - mask.shape[1]
        if gap > 0:  # the new rows are shorter: add_rows right-aligns them, their mask says where they start
            mask = F.pad(mask, (gap, 0))
        elif gap < 0:
            shift_columns(self.cache, -gap)
            self.mask = F.pad(self.mask, (-gap, 0))
        join_rows(self.cache, cache)
        self.mask = torch.cat([self.mask, mask])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.logits = torch.cat([self.logits, logits])
        if self.row_R is not None or R is not None:
            self.row_R = torch.cat([self.adapters.or_zeros(self.row_R, len(self.running)),
                                    self.adapters.or_zeros(R, len(new))])
        self.running += new

    def _retire(self) -> torch.Tensor | None:
        """Drop finished rows from the batch; returns the kept row indices (None: all kept)."""
        if not any(s.done for s in self.running):
            return None
        keep = [i for i, s in enumerate(self.running) if not s.done]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.reset()
            return torch.tensor([], dtype=torch.long)
        idx = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]
        self.logits = self.logits[idx]
        if self.row_R is not None:
            self.row_R = self.row_R[idx]
        self._trim()
        return idx

    def _trim(self) -> None:
        """Drop leading KV columns that no running row attends to (left by rows that have left)."""
        if not self.compact:
            return
        first = int(self.mask.any(dim=0).int().argmax())  # first column some row attends to
        if first > 0:
            shift_columns(self.cache, -first)
            self.mask = self.mask[:, first:]

    def _decode(self, tok: torch.Tensor) -> None:
        """One forward of each running row's newest token [n]: the logits of the next."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.running), 1)], dim=1)  # [n, L + 1]
        if self.fixed is not None:
            self.cache = self._fixed_slots()  # back into the fixed buffers once it fits them again
        if self.fixed is not None and self.fixed.covers(self.cache):
            R = self.adapters.for_fixed_step(self.row_R, len(tok), hooked=self.fixed.adapter is not None)
            self.logits = self.fixed.decode(self.cache, tok, self.mask, self.next_pos, R)  # [n, V]
            self.next_pos = self.next_pos + 1
            return
        fold = folded_decode(self.model) if self.shared is None else contextlib.nullcontext()  # generate: as recorded
        with self.adapters.context(self.row_R), fold:
            self.logits = self.model(input_ids=tok[:, None], attention_mask=self.mask,
                                     position_ids=self.next_pos[:, None],
                                     **with_cache(self.model, self.cache)).logits[:, -1]  # [n, V]
        self.next_pos = self.next_pos + 1

    def _fixed_slots(self):
        """The running cache in the fixed-shape step's buffers, sized for max_batch rows and the columns its rows
        may reach (each row's remaining new tokens)."""
        need = self.mask.shape[1] + max(s.sampling.max_new_tokens - len(s.tokens) for s in self.running) - 1
        return self.fixed.slots(self.cache, self.max_batch, need)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False, seed: int = 0, with_logprobs: bool = True, repeats: int = 1) -> Rollout:
    """`repeats` completions per prompt from the model's weights as they are, through the `Engine`.

    Seeded: same seed, same output. Each prompt is prefilled once and its cache copied for its `repeats`
    samples (GRPO's G); finished rows leave the batch, so the cost follows the mean completion length,
    not the longest; each token's log-prob under the sampling law comes for free (for the importance
    correction).
    """
    return Engine(model, tokenizer, weights="merged").generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, seed=seed,
        with_logprobs=with_logprobs, repeats=repeats)
