"""Shared fixtures: real llmrelay processes on free loopback ports, real bundled models.

One stack is started per test session (controller, two SmolLM2 workers named `smol`, one
Gemma 3 270M worker named `gemma`, API server). Tests that kill or restart processes start
their own with `Procs`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from llmrelay.worker.managed import free_port

# SmolLM2 as an HF folder, for the transformers engine: the bundled GGUF loaded and dequantized by
# transformers, its GGUF quantizer marker cleared, saved with save_pretrained (`smol_hf`).
CONVERT = r"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmrelay.worker.models import resolve
gguf, out = resolve("smollm2").path, sys.argv[1]
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
"""

HEARTBEAT = "1"  # seconds; tests use a short interval so expiry and rejoin are quick
# Workers run one llama.cpp thread each: several workers spinning two threads each on a 2-core
# machine slow every one of them down many times over.


def wait_for(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Proc:
    """One llmrelay process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmrelay.cli", *self.argv],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Procs:
    """Starts processes for one test and stops them all afterwards."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Proc] = []

    def controller(self, port: int | None = None, extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._start(f"controller-{port}", ["controller", "--port", str(port),
                                                "--heartbeat-interval", HEARTBEAT, *extra])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/test_connection").status_code == 200, 30,
                 "the controller")
        return p, url

    def worker(self, controller: str, names: str = "smol", model: str = "smollm2",
               port: int | None = None, wait: bool = True,
               extra: tuple[str, ...] = (), load_timeout: float = 60) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._start(f"worker-{names}-{port}", [
            "worker", "--port", str(port), "--controller-address", controller,
            "--model-path", model, "--model-names", names, "--heartbeat-interval", HEARTBEAT,
            "--context-length", "2048", "--n-threads", "1", *extra])
        url = f"http://127.0.0.1:{port}"
        if wait:
            wait_for(lambda: httpx.post(url + "/worker_get_status").status_code == 200,
                     load_timeout,
                     f"worker {names}")
        return p, url

    def api(self, controller: str, port: int | None = None, extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._start(f"api-{port}", ["api", "--port", str(port), "--controller-address",
                                        controller, "--table-refresh", "0.5", *extra])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, 30, "the API server")
        return p, url

    def _start(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.log_dir).start()
        self.all.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.all):
            p.stop(timeout=5)


def registered(controller: str, worker_url: str) -> bool:
    table = httpx.get(controller + "/worker_table").json()
    return any(w["name"] == worker_url for w in table["workers"])


def api_models(api: str) -> set[str]:
    return {m["id"] for m in httpx.get(api + "/v1/models").json()["data"]}


@dataclass
class Stack:
    controller: str
    api: str
    smol_workers: list[str]
    gemma_worker: str
    procs: Procs

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0,
                             timeout=120, **kw)  # type: ignore[arg-type]

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the smol workers run and queue nothing (an earlier test's generations can
        outlive it). A greedy answer of these tiny quantized models can change with what else
        shares its batch (llama.cpp's kernels differ with the batch's size), so tests comparing
        greedy answers start on idle workers."""
        def idle() -> bool:
            for url in self.smol_workers:
                status = httpx.post(url + "/worker_get_status").json()
                if status.get("queue_length") or (status.get("llmrelay") or {}).get("running"):
                    return False
            return True
        wait_for(idle, timeout, "the shared smol workers to be idle")


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The processes' state folder (API servers' usage databases, stacks' tokens), here rather
    than in the user's own; first of the session's fixtures (autouse)."""
    path = tmp_path_factory.mktemp("state")
    before = os.environ.get("LLMRELAY_STATE_DIR")
    os.environ["LLMRELAY_STATE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("LLMRELAY_STATE_DIR", None)
    else:
        os.environ["LLMRELAY_STATE_DIR"] = before


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def stack(logs_dir: Path) -> Iterator[Stack]:
    procs = Procs(logs_dir)
    try:
        _, controller = procs.controller()
        _, smol1 = procs.worker(controller, "smol", wait=False)
        _, smol2 = procs.worker(controller, "smol", wait=False)
        _, gemma = procs.worker(controller, "gemma", "gemma3-270m", wait=False)
        for url in (smol1, smol2, gemma):
            wait_for(lambda url=url: registered(controller, url), 120, f"worker {url}")
        _, api = procs.api(controller)
        wait_for(lambda: api_models(api) == {"smol", "gemma"}, 30, "models in the API")
        yield Stack(controller, api, [smol1, smol2], gemma, procs)
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def smol_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 as an HF folder (made once per session; see CONVERT)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf") / "smollm2-hf"
    subprocess.run([sys.executable, "-c", CONVERT, str(out)], check=True, timeout=600,
                   capture_output=True)
    assert (out / "config.json").exists()
    return out


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return stack.client()
