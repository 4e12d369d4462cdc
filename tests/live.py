"""A real `phikit serve` process on loopback for tests that need one (a crash shows as an exit code, and
real clients connect to it over TCP): tests/serve/test_serve_hostile.py and tests/clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from phikit.serve.thread import free_port


class ServeProcess:
    """`phikit serve ARGS` on a free loopback port, its output in `log_path`; `start()` returns once /health answers."""

    def __init__(self, log_path: Path, args: list[str], env: dict | None = None, wait_s: float = 180):
        self.log_path, self.args, self.env, self.wait_s = Path(log_path), args, env, wait_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "phikit.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
                                          *self.args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                health = httpx.get(self.url + "/health")
                if health.status_code == 200:
                    self.ready(health.json())
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()[-3000:]
            time.sleep(0.2)

    def ready(self, health: dict) -> None:
        """Called with /health's answer once the server is up (a subclass checks what it needs)."""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
