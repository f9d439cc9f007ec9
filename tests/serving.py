"""A `tinylora serve` app on a free local port, run by uvicorn in a thread, for the tests that talk HTTP to it."""

from __future__ import annotations

import socket
import threading

import uvicorn
from waiting import HANG_GUARD_S, wait_until

from tinylora.serve.app import create_app


class ServerThread:
    """`with ServerThread(server) as s:` serves `server` (a `tinylora.serve` Server) at `s.url` until the block ends."""

    def __init__(self, server):
        self.server = server
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port,
                                                log_level="warning", timeout_graceful_shutdown=HANG_GUARD_S))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.uv.started, self.thread.is_alive, "the server started")
        return self

    def __exit__(self, *exc):
        self.uv.should_exit = True
        self.thread.join(HANG_GUARD_S)
