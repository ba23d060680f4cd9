"""Managed upstream servers: an OpenAI-compatible server run by the worker as its child process.

The `openai` engine fronts any OpenAI-compatible base URL. In *managed* mode the worker also
starts that server itself: on a free loopback port, waits until it answers `GET /v1/models`,
restarts it (with backoff) whenever it dies, and stops it when the worker stops. Our flags are
mapped to the server's own flags by pure functions (`llamacpp_server_argv`, `vllm_argv`) that
tests check without starting anything.

Two servers are known: llama.cpp's own server (`python -m llama_cpp.server`, from
`llama-cpp-python[server]`) and vLLM (`vllm serve`, the `vllm` extra). Neither is imported
here: they run as separate processes.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger("llmrelay.worker")

SERVERS = ("llama-cpp-server", "vllm")
VLLM_INSTALL_HINT = ("vLLM is not installed: install it with `pip install 'llmrelay[vllm]'` "
                     "(vLLM needs a supported GPU; see docs/backends.md)")


class ManagedError(Exception):
    """The managed server cannot be started; the message says why and what to do."""


@dataclass
class ManagedOptions:
    """Our flags, as the managed server needs them."""

    model_path: str
    served_names: list[str]
    port: int
    host: str = "127.0.0.1"
    context_length: int | None = None
    n_threads: int | None = None
    seed: int | None = None
    device: str | None = None
    num_gpus: int | None = None
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str | None = None
    max_num_seqs: int | None = None
    extra_args: list[str] = field(default_factory=list)


def options_from_args(args: argparse.Namespace, model_path: str, names: list[str],
                      port: int) -> ManagedOptions:
    """The worker's parsed flags -> the managed server's options."""
    return ManagedOptions(
        model_path=model_path, served_names=names, port=port,
        context_length=args.context_length, n_threads=args.n_threads, seed=args.seed,
        device=args.device, num_gpus=args.num_gpus,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype,
        max_num_seqs=args.limit_worker_concurrency,
        extra_args=split_args(args.managed_args))


def llamacpp_server_argv(o: ManagedOptions, python: str = sys.executable) -> list[str]:
    """`python -m llama_cpp.server` with our flags mapped to its flags.

    Requests are never interrupted by newer ones (its default `--interrupt_requests true` would
    abort a running stream whenever another request arrives); the model is served under our
    first public name.
    """
    argv = [python, "-m", "llama_cpp.server", "--model", o.model_path,
            "--model_alias", o.served_names[0], "--host", o.host, "--port", str(o.port),
            "--interrupt_requests", "false"]
    if o.context_length:
        argv += ["--n_ctx", str(o.context_length)]
    if o.n_threads:
        argv += ["--n_threads", str(o.n_threads), "--n_threads_batch", str(o.n_threads)]
    if o.seed is not None:
        argv += ["--seed", str(o.seed)]
    if o.device in ("cuda", "mps") or (o.num_gpus or 0) > 0:
        argv += ["--n_gpu_layers", "-1"]
    return argv + list(o.extra_args)


def vllm_argv(o: ManagedOptions, vllm: str = "vllm") -> list[str]:
    """`vllm serve` with our (and the seed's FastChat vllm_worker's) flags mapped to its flags.

    `--tensor-parallel-size` defaults to `--num-gpus` (as in FastChat's vllm_worker);
    `--context-length` becomes `--max-model-len`; `--limit-worker-concurrency` becomes
    `--max-num-seqs`; every public name is a `--served-model-name`.
    """
    argv = [vllm, "serve", o.model_path, "--host", o.host, "--port", str(o.port),
            "--served-model-name", *o.served_names]
    tp = o.tensor_parallel_size or o.num_gpus
    if tp:
        argv += ["--tensor-parallel-size", str(tp)]
    if o.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(o.gpu_memory_utilization)]
    if o.context_length:
        argv += ["--max-model-len", str(o.context_length)]
    if o.dtype:
        argv += ["--dtype", o.dtype]
    if o.seed is not None:
        argv += ["--seed", str(o.seed)]
    if o.max_num_seqs:
        argv += ["--max-num-seqs", str(o.max_num_seqs)]
    return argv + list(o.extra_args)


def find_vllm() -> str:
    """The `vllm` command next to this Python, else on PATH; ManagedError with the hint if none."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ManagedError(VLLM_INSTALL_HINT)
    beside = Path(sys.executable).parent / "vllm"
    if beside.exists():
        return str(beside)
    found = shutil.which("vllm")
    if found is None:
        raise ManagedError("the vllm package is installed but its `vllm` command is not on PATH")
    return found


_GIVEN: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port on `host`, never one this process handed out before: the kernel may offer
    a just-released port again before the process it was given to has bound it. (The tests
    and benchmarks use this too.)"""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def split_args(value: str | None) -> list[str]:
    return shlex.split(value) if value else []


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a SIGKILLed worker
    except (OSError, AttributeError):             # leaves no orphaned server behind
        pass


class ManagedServer:
    """One child server: started, watched and restarted by a monitor thread, stopped on demand.

    The child keeps the same port across restarts, so the engine's base URL never changes. It
    inherits the worker's stdout/stderr, so its log lines appear in the worker's log.
    """

    def __init__(self, name: str, argv: list[str], base_url: str,
                 env: dict[str, str] | None = None, max_backoff: float = 30.0) -> None:
        self.name = name
        self.argv = argv
        self.base_url = base_url.rstrip("/")
        self.env = env
        self.max_backoff = max_backoff
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at = 0.0
        self._stopping = threading.Event()
        self._spawned = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_exit: Callable[[int], None] | None = None  # told when the child dies

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, object]:
        return {"server": self.name, "pid": self.pid, "alive": self.alive(),
                "restarts": self.restarts, "last_exit_code": self.last_exit,
                "command": shlex.join(self.argv)}

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            log.info("starting %s: %s", self.name, shlex.join(self.argv))
            try:
                self.proc = subprocess.Popen(
                    self.argv, env=dict(os.environ, **(self.env or {})),
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            except OSError as e:
                log.error("cannot start %s (%s): %s", self.name, self.argv[0], e)
                self.proc = None
            self.started_at = time.monotonic()
        self._spawned.set()

    def _monitor(self) -> None:
        # Spawned from this thread on purpose: PR_SET_PDEATHSIG fires when the *thread* that
        # forked the child ends, and this one lives as long as the server is managed.
        delay = 1.0
        self._spawn()
        while not self._stopping.is_set():
            proc = self.proc
            if proc is None:
                code = -1
            else:
                code = proc.wait()
            if self._stopping.is_set():
                return
            self.last_exit = code
            if self.on_exit is not None:
                self.on_exit(code)
            if time.monotonic() - self.started_at > 60:
                delay = 1.0  # it had been running a while: restart at once-ish
            log.warning("%s exited with code %s; restarting it in %.0f s", self.name, code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.max_backoff)
            self.restarts += 1
            self._spawn()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._monitor, name=f"managed-{self.name}",
                                        daemon=True)
        self._thread.start()
        self._spawned.wait(30)

    def wait_ready(self, timeout: float, headers: dict[str, str] | None = None) -> None:
        """Block until `GET {base_url}/models` answers 200. A child that exits before it was
        ever ready is an error (bad flags, missing model): restarting it would only loop."""
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + 10
        with httpx.Client(timeout=2.0, headers=headers) as client:
            while True:
                proc = self.proc
                if proc is None or proc.poll() is not None:
                    self.stop()
                    code = proc.returncode if proc is not None else "(not started)"
                    raise ManagedError(f"{self.name} exited with code {code} before it was "
                                       "ready; its output is above in this log")
                try:
                    if client.get(self.base_url + "/models").status_code == 200:
                        log.info("%s ready at %s (%.1f s)", self.name, self.base_url,
                                 time.monotonic() - self.started_at)
                        return
                except httpx.HTTPError:
                    pass
                now = time.monotonic()
                if now > deadline:
                    self.stop()
                    raise ManagedError(f"{self.name} was not ready after {timeout:.0f} s "
                                       "(raise --managed-start-timeout if it loads slowly)")
                if now >= next_note:
                    log.info("waiting for %s to load (%.0f s)", self.name, now - self.started_at)
                    next_note = now + 10
                time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; no restart afterwards."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping %s (pid %d)", self.name, proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            proc.kill()
            proc.wait()
