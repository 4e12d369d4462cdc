"""Run the server on a background thread: for tests, benchmarks and notebooks.

    with ServerThread(create_app(model)) as srv:
        print(srv.url)   # http://127.0.0.1:PORT, a free port picked for you
"""

from __future__ import annotations

import socket
import threading
import time

from ..errors import PhikitError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on `host:port` in a daemon thread; a context manager that stops it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        from .app import MAX_HEADER_BYTES, http_protocol

        self.host, self.port = host, port or free_port(host)
        # The same HTTP protocol as `serve()`: a head over the limit is a 431, never an unbounded read.
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level, timeout_graceful_shutdown=2,
                                                    http=http_protocol(), h11_max_incomplete_event_size=MAX_HEADER_BYTES))
        self.thread = threading.Thread(target=self.server.run, name="phikit-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PhikitError(f"the server did not start on {self.url} (is the port taken?)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
