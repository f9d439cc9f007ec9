"""The engine's thread: requests come in from the event loop, tokens go back to it.

The Engine is not thread-safe, so exactly one thread touches it: this one. The event loop hands it
work as closures through a queue and gets events back through `loop.call_soon_threadsafe`; between two
decode steps the thread admits whatever arrived, so a request joins the running batch within one step. An idle
engine waits `admit_wait` seconds after the first request before its first step, so a burst of clients is
prefilled in one forward instead of the first alone and the rest a step later.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from tinylora.generation.engine import Engine
from tinylora.generation.sequence import Sampling, Sequence


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One request's rows (n choices of one prompt) and the asyncio queue its events go to."""
    prompt: list[int]
    sampling: Sampling
    R: torch.Tensor | None
    n: int
    events: asyncio.Queue  # shared by all jobs of one request
    loop: asyncio.AbstractEventLoop
    base: int = 0  # the request's choice index of this job's first row
    seqs: list[Sequence] = field(default_factory=list)

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    def __init__(self, engine: Engine, max_queue: int = 256, admit_wait: float = 0.0):
        self.engine, self.max_queue, self.admit_wait = engine, max_queue, admit_wait
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.rows = 0  # rows submitted and not yet finished (admission control, under `lock`)
        self.lock = threading.Lock()
        self.owner: dict[int, tuple[Job, int]] = {}  # id(Sequence) -> (job, choice index); engine thread only
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="tinylora-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted row, then end the thread."""
        with self.lock:
            self.stopping = True
            self.inbox.put(lambda: None)  # wake it
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when it would take more rows than `max_queue` allows."""
        with self.lock:  # the put is inside: stop() cannot slip in between the check and it
            if self.stopping or not self.alive:
                raise QueueFull("the server is shutting down")
            if self.rows + job.n > self.max_queue:
                raise QueueFull(f"{self.rows} rows are queued or running (limit {self.max_queue}); retry later")
            self.rows += job.n
            self.inbox.put(lambda: self._add(job))

    def call(self, fn, loop: asyncio.AbstractEventLoop, *, admit: bool = True) -> asyncio.Future:
        """Run `fn()` on the engine thread between two decode steps (model work that must not race the engine:
        scoring a prompt); its result, or its exception, comes back as the future's. It counts as one row while
        queued or running; `admit`: refused with QueueFull when that would pass `max_queue` (else only when
        shutting down: the work of a request already admitted)."""
        future = loop.create_future()

        def run():
            try:
                result, error = fn(), None
            except Exception as e:  # this call only
                result, error = None, e
            finally:
                with self.lock:
                    self.rows -= 1
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the event loop has closed: nobody waits for it
                pass

        with self.lock:
            if self.stopping or not self.alive:
                raise QueueFull("the server is shutting down")
            if admit and self.rows + 1 > self.max_queue:
                raise QueueFull(f"{self.rows} rows are queued or running (limit {self.max_queue}); retry later")
            self.rows += 1
            self.inbox.put(run)
        return future

    def cancel(self, job: Job, reason: str = "abort") -> None:
        self.inbox.put(lambda: [self.engine.cancel(s, reason) for s in job.seqs])

    def cancel_row(self, job: Job, index: int, reason: str = "stop") -> None:
        self.inbox.put(lambda: self.engine.cancel(job.seqs[index], reason) if job.seqs else None)

    # ---- the engine thread --------------------------------------------------------------------------
    def _add(self, job: Job) -> None:
        try:
            job.seqs = self.engine.add(job.prompt, job.sampling, R=job.R, n=job.n)
        except Exception as e:  # this job only
            for j in range(job.n):
                job.emit(("error", job.base + j, None, f"{type(e).__name__}: {e}"))
            with self.lock:
                self.rows -= job.n
            return
        for j, s in enumerate(job.seqs):
            self.owner[id(s)] = (job, j)

    def _run(self) -> None:
        with torch.inference_mode(), self.engine.generating():
            while True:
                try:
                    was_idle = self.engine.idle
                    self._drain(block=was_idle and not self.stopping)
                    if was_idle and not self.engine.idle and self.admit_wait > 0:
                        self._gather(time.monotonic() + self.admit_wait)
                    if self.engine.idle:
                        if self.stopping and self.inbox.empty():
                            return
                        continue
                    for s in self.engine.step():
                        self._emit(s)
                    self._close_cancelled()
                except Exception as e:  # never let the thread die: fail the rows in flight, keep serving
                    self._fail_all(e)

    def _drain(self, block: bool) -> None:
        try:
            fn = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _gather(self, deadline: float) -> None:
        """Take whatever else arrives before `deadline` (the engine was idle: a burst starts together)."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                fn = self.inbox.get(timeout=left)
            except queue.Empty:
                return
            fn()

    def _emit(self, s: Sequence) -> None:
        """The token `s` just got (and its finish reason, if that ended it)."""
        job, j = self.owner[id(s)]
        job.emit(("token", job.base + j, s.tokens[-1], s.finish_reason))
        if s.done:
            self._close(s)

    def _close(self, s: Sequence) -> None:
        self.owner.pop(id(s))
        with self.lock:
            self.rows -= 1

    def _close_cancelled(self) -> None:
        """Rows cancelled (running or still waiting) leave the engine without a token: close them here."""
        live = {id(s) for s in self.engine.live()}
        for key in [k for k in self.owner if k not in live]:
            job, j = self.owner[key]
            job.emit(("token", job.base + j, None, job.seqs[j].finish_reason or "abort"))
            self._close(job.seqs[j])

    def _fail_all(self, error: Exception) -> None:
        for key in list(self.owner):
            job, j = self.owner[key]
            job.emit(("error", job.base + j, None, f"{type(error).__name__}: {error}"))
            self._close(job.seqs[j])
        self.engine.drop_all()


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.cancelled():  # the request went away meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
