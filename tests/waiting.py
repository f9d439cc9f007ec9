"""Waiting on another process or thread without letting the machine's speed decide a test.

How long a subprocess takes to write its first metrics line, or a server to come up, depends on the machine
(two busy cores or a fast workstation), so no test asserts that anything happens within some time.
`wait_until` polls until the condition holds and fails at once when what it waits on has ended without it
(then it never will). HANG_GUARD_S only turns a hang into a clear error instead of a stuck test run: it is far
above what any run needs, so it never decides a normal run; the tests also use it as their timeout for
requests, subprocesses and joins.
"""

from __future__ import annotations

import time
from pathlib import Path

HANG_GUARD_S = 600.0


def wait_until(condition, alive, what: str, details=lambda: "", poll_s: float = 0.02) -> None:
    """Return once `condition()` holds. Raise if `alive()` turns false first, or after HANG_GUARD_S (a hang).

    `what` names the condition in the error; `details()` adds to it (a subprocess's output, say)."""
    start = time.monotonic()
    while not condition():
        if not alive():
            if condition():  # it happened just before the end
                return
            raise AssertionError(f"never happened: {what} (what it depended on ended first) {details()}")
        if time.monotonic() - start > HANG_GUARD_S:
            raise TimeoutError(f"hung: still waiting, after {HANG_GUARD_S:.0f} s, until {what} {details()}")
        time.sleep(poll_s)


def running(proc) -> callable:
    """`alive` for a subprocess.Popen."""
    return lambda: proc.poll() is None


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0
