"""The engine thread: an idle engine waits `admit_wait` for a burst, so it is prefilled in one step."""

import asyncio
import time

import pytest

from tinylora.generation.engine import Engine, Sampling
from tinylora.serve.worker import Job, Worker
from tinylora.testing import tiny_model_and_tokenizer


class Recording(Engine):
    """An Engine that records how many rows each step served."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_per_step = []

    def step(self):
        stepped = super().step()
        if stepped:
            self.rows_per_step.append(len(stepped))
        return stepped


def first_step_rows(admit_wait: float, gap: float) -> int:
    """Rows in the first step when a second request arrives `gap` seconds after the first."""
    model, tok = tiny_model_and_tokenizer("llama")
    engine = Recording(model, tok, weights="merged")
    worker = Worker(engine, admit_wait=admit_wait)
    worker.start()

    async def two_requests():
        loop = asyncio.get_running_loop()
        jobs = [Job([5, 6, 7], Sampling(max_new_tokens=4, temperature=0), None, 1, asyncio.Queue(), loop)
                for _ in range(2)]
        worker.submit(jobs[0])
        await asyncio.sleep(gap)
        worker.submit(jobs[1])
        for job in jobs:  # until each row's last token
            while (await job.events.get())[3] is None:
                pass

    asyncio.run(two_requests())
    worker.stop(timeout=30)
    return engine.rows_per_step[0]


def test_idle_engine_admits_a_burst_together():
    assert first_step_rows(admit_wait=3.0, gap=0.2) == 2


@pytest.mark.parametrize("admit_wait", [0.0, 0.01])
def test_without_a_wait_the_first_request_starts_alone(admit_wait):
    assert first_step_rows(admit_wait=admit_wait, gap=0.5) == 1


def test_the_wait_is_bounded():
    """One request alone starts after the wait, not later."""
    model, tok = tiny_model_and_tokenizer("llama")
    worker = Worker(Engine(model, tok, weights="merged"), admit_wait=0.3)
    worker.start()

    async def one_request():
        job = Job([5, 6], Sampling(max_new_tokens=1, temperature=0), None, 1, asyncio.Queue(),
                  asyncio.get_running_loop())
        t = time.monotonic()
        worker.submit(job)
        await job.events.get()
        return time.monotonic() - t

    waited = asyncio.run(one_request())
    worker.stop(timeout=30)
    assert 0.3 <= waited < 30
