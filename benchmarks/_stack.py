"""Start a real llmrelay stack (controller, workers, API server) on free loopback ports.

Shared by the benchmark scripts; each process's output goes to a log file in a temporary folder.

Every child starts in its own session (so a Ctrl-C in the terminal reaches only the script) and
is remembered here; they are all stopped when the script exits, normally or by an exception
(atexit), and on SIGINT, SIGTERM and SIGHUP (the handler stops them, then exits with 128 + the
signal). A stopped child gets SIGTERM on its whole process group, then SIGKILL after 10 s.
`spawn()` starts any other child (a FastChat process) under the same guard.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from llmrelay.worker.managed import free_port

_children: list[subprocess.Popen[bytes]] = []
_lock = threading.RLock()  # the signal handler may run while the main thread holds it


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session, output to `log`, stopped when this script ends."""
    install_guards()
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    with _lock:
        _children.append(p)
    return p


def stop_children(procs: list[subprocess.Popen[bytes]] | None = None, grace: float = 10.0) -> None:
    """SIGTERM to each child's process group, then SIGKILL to those still alive after `grace`."""
    with _lock:
        targets = list(_children if procs is None else procs)
    for p in reversed(targets):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in targets:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    with _lock:
        for p in targets:
            if p in _children:
                _children.remove(p)


_installed = False


def _on_signal(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    print(f"\n{signal.Signals(signum).name}: stopping {len(_children)} child processes",
          file=sys.stderr)
    stop_children()
    os._exit(128 + signum)


def install_guards() -> None:
    """atexit + SIGINT/SIGTERM/SIGHUP handlers that stop every child (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(stop_children)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)


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
        self.procs.append(spawn([sys.executable, "-m", "llmrelay.cli", *argv],
                                self.logs / f"{name}.log"))

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
        stop_children(self.procs)


def load_average() -> str:
    """The machine's 1/5/15-minute load averages, to print with a result (shared machine)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"
