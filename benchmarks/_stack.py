"""Start a real llmrelay stack (controller, workers, API server) on free loopback ports.

Shared by the benchmark scripts; each process's output goes to a log file in a temporary folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Stack:
    """A controller, some workers and an API server; `stop()` ends them all."""

    def __init__(self) -> None:
        self.logs = Path(tempfile.mkdtemp(prefix="llmrelay-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.controller = ""
        self.api = ""
        self.workers: list[str] = []

    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "llmrelay.cli", *argv], stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1")))

    def start_controller(self, extra: tuple[str, ...] = ()) -> str:
        port = free_port()
        self._start("controller", ["controller", "--port", str(port),
                                   "--heartbeat-interval", "1", *extra])
        self.controller = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(self.controller + "/test_connection").status_code == 200,
                 30, "the controller")
        return self.controller

    def start_worker(self, model: str = "smollm2", names: str = "smol",
                     extra: tuple[str, ...] = ()) -> str:
        port = free_port()
        self._start(f"worker-{port}", [
            "worker", "--port", str(port), "--controller-address", self.controller,
            "--model-path", model, "--model-names", names, "--heartbeat-interval", "1", *extra])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: any(w["name"] == url for w in
                             httpx.get(self.controller + "/worker_table").json()["workers"]),
                 120, f"worker {url}")
        self.workers.append(url)
        return url

    def start_api(self, extra: tuple[str, ...] = ()) -> str:
        port = free_port()
        self._start("api", ["api", "--port", str(port), "--controller-address", self.controller,
                            "--table-refresh", "0.5", *extra])
        self.api = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(self.api + "/health").status_code == 200, 30,
                 "the API server")
        return self.api

    def wait_models(self, n_workers: int) -> None:
        def ready() -> bool:
            table = httpx.get(self.controller + "/worker_table").json()
            return len(table["workers"]) >= n_workers and bool(
                httpx.get(self.api + "/v1/models").json()["data"])
        wait_for(ready, 60, "the models in the API server")
        time.sleep(1.0)  # one table refresh more, so the API server sees every worker

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds used so far by each process (Linux /proc)."""
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for p in self.procs:
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[" ".join(map(str, p.args[3:5]))] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
