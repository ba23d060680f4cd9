"""Processes coming and going: start order, controller restarts and outages, dead workers,
cancellation, API keys, FastChat's module paths and flags, and `llmrelay up`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import Procs, Stack, api_models, free_port, registered, wait_for

Q = [{"role": "user", "content": "Say hello."}]


def chat(api: str, **kw: object) -> str:
    c = openai.OpenAI(base_url=api + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="smol", messages=Q, max_tokens=4, **kw)  # type: ignore
    return r.choices[0].message.content or ""


def test_start_in_reverse_order(procs: Procs) -> None:
    cport = free_port()
    controller = f"http://127.0.0.1:{cport}"
    _, api = procs.api(controller)
    assert httpx.get(api + "/v1/models").json()["data"] == []
    r = httpx.post(api + "/v1/chat/completions", json={"model": "smol", "messages": Q})
    assert r.status_code == 503 and "not reachable" in r.json()["error"]["message"]
    wproc, worker = procs.worker(controller, "smol")  # no controller yet: it keeps retrying
    wait_for(lambda: "not reachable" in wproc.log(), 10, "the worker's retry message")
    procs.controller(cport)
    wait_for(lambda: "smol" in api_models(api), 15, "the worker to appear in the API")
    assert chat(api)


def test_controller_restart_and_outage(procs: Procs) -> None:
    cport = free_port()
    cproc, controller = procs.controller(cport)
    _, worker = procs.worker(controller, "smol")
    _, api = procs.api(controller)
    wait_for(lambda: "smol" in api_models(api), 15, "the model in the API")
    cproc.kill()
    # the API server keeps serving from its last table while the controller is gone
    time.sleep(1.5)
    assert api_models(api) == {"smol"}
    assert chat(api)
    health = httpx.get(api + "/health").json()
    assert health["controller_reachable"] is False
    # a restarted controller is whole again within a few heartbeats (interval 1 s here)
    cproc2, _ = procs.controller(cport)
    t0 = time.monotonic()
    wait_for(lambda: registered(controller, worker), 10, "the worker to re-register")
    assert time.monotonic() - t0 < 6
    wait_for(lambda: httpx.get(api + "/health").json()["controller_reachable"], 10,
             "the API to see the controller again")
    assert chat(api)
    assert "forgot this worker" in procs.all[1].log()


def test_dead_worker_expires_and_api_fails_over(procs: Procs) -> None:
    _, controller = procs.controller()
    w1, url1 = procs.worker(controller, "smol")
    _, url2 = procs.worker(controller, "smol")
    _, api = procs.api(controller)
    wait_for(lambda: registered(controller, url1) and registered(controller, url2), 15)
    w1.kill()
    # before the controller notices, requests still succeed: refused connections fail over
    for _ in range(4):
        assert chat(api)
    t0 = time.monotonic()
    wait_for(lambda: not registered(controller, url1), 10, "the dead worker to expire")
    assert time.monotonic() - t0 < 6  # 3 missed heartbeats of 1 s, plus the sweep period


def test_known_model_without_live_worker_is_503(procs: Procs) -> None:
    _, controller = procs.controller()
    w, url = procs.worker(controller, "smol")
    _, api = procs.api(controller)
    wait_for(lambda: "smol" in api_models(api), 15)
    w.kill()  # still in the table until it misses 3 heartbeats
    r = httpx.post(api + "/v1/chat/completions", json={"model": "smol", "messages": Q})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "server_error"
    assert "Retry-After" in r.headers


def test_client_disconnect_cancels_generation(stack: Stack) -> None:
    def running() -> int:
        return sum(httpx.post(w + "/worker_get_status").json()["llmrelay"]["running"]
                   for w in stack.smol_workers)

    # counting goes on and on: without cancellation this runs for many seconds
    long = {"model": "smol", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1500, "temperature": 0}
    with httpx.stream("POST", stack.api + "/v1/completions",
                      json={**long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()  # kept open: dropping the iterator would close the response
        for _ in range(7):
            next(lines)
        assert running() == 1
    t0 = time.monotonic()
    wait_for(lambda: running() == 0, 10, "the worker to stop after a streaming client left")
    stream_cancel = time.monotonic() - t0
    # non-streaming: the client gives up after 1 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.api + "/v1/completions", json=long, timeout=1.0)
    wait_for(lambda: running() == 0, 10, "the worker to stop after a non-streaming client left")
    assert stream_cancel < 10


def test_api_keys(stack: Stack, procs: Procs) -> None:
    _, api = procs.api(stack.controller, extra=("--api-keys", "key-one,key-two"))
    wait_for(lambda: httpx.get(api + "/health", headers={"Authorization": "Bearer key-two"})
             .json()["models"], 10)  # the details are for admin keys (plain keys are)
    assert httpx.get(api + "/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
        r = httpx.get(api + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=api + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="smol", messages=Q, max_tokens=1)
    good = openai.OpenAI(base_url=api + "/v1", api_key="key-two", max_retries=0)
    assert good.chat.completions.create(model="smol", messages=Q, max_tokens=1).choices
    assert "key-one" not in procs.all[0].log()


def test_fastchat_module_paths_and_flags(tmp_path: Path) -> None:
    """The seed's start script, with `fastchat` replaced by `llmrelay`."""
    cport, wport, aport = free_port(), free_port(), free_port()
    py = sys.executable
    logs = []
    procs = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{len(procs)}.log"
        logs.append(log)
        p = subprocess.Popen([py, "-m", *argv], stdout=open(log, "wb"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        start("llmrelay.serve.controller", "--host", "127.0.0.1", "--port", str(cport),
              "--dispatch-method", "shortest_queue")
        start("llmrelay.serve.model_worker", "--host", "127.0.0.1", "--port", str(wport),
              "--worker-address", f"http://localhost:{wport}",
              "--controller-address", f"http://localhost:{cport}",
              "--model-path", "smollm2", "--model-names", "smol,smol-alias", "--num-gpus", "1")
        start("llmrelay.serve.openai_api_server", "--host", "127.0.0.1", "--port", str(aport),
              "--controller-address", f"http://localhost:{cport}", "--allowed-origins", '["*"]')
        api = f"http://127.0.0.1:{aport}"
        wait_for(lambda: api_models(api) == {"smol", "smol-alias"}, 60, "the seed's stack")
        assert chat(api)
        assert "no GPU" in logs[1].read_text()  # --num-gpus 1 on a CPU-only machine: a warning
        r = httpx.get(f"http://127.0.0.1:{cport}/list_models")
        assert sorted(r.json()["models"]) == ["smol", "smol-alias"]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "no GPU support"),
    (["--model-path", "/nowhere/model.gguf"], "smollm2"),
    (["--model-path", "gemma3-270m", "--chat-template", "no-such-template"], "known name"),
    (["--limit-worker-concurrency", "0"], "at least 1"),
    (["--kv-cache", "shared"], "invalid choice: 'shared'"),
])
def test_worker_refuses_flags_it_cannot_honour(argv: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "llmrelay.cli", "worker", "--port",
                        str(free_port()), "--no-register", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_worker_warns_about_flags_llamacpp_ignores(procs: Procs) -> None:
    _, controller = procs.controller()
    p, _ = procs.worker(controller, "smol", extra=("--load-8bit", "--max-gpu-memory", "12GiB"))
    log = p.log()
    assert "--load-8bit" in log and "already" in log
    assert "--max-gpu-memory" in log


def test_llmrelay_up_with_a_stack_file(tmp_path: Path) -> None:
    cport, aport, w1, w2 = free_port(), free_port(), free_port(), free_port()
    stack = tmp_path / "stack.toml"
    stack.write_text(f"""
registration_token = "stack-secret"

[controller]
port = {cport}
dispatch_method = "lottery"
heartbeat_interval = 1

[api]
port = {aport}

[[worker]]
model_path = "smollm2"
model_names = ["smol", "smollm2"]
port = {w1}
context_length = 2048

[[worker]]
model_path = "gemma3-270m"
model_names = ["gemma"]
port = {w2}
context_length = 2048
""")
    out = tmp_path / "up.out"
    p = subprocess.Popen([sys.executable, "-m", "llmrelay.cli", "up", str(stack), "--log-dir",
                          str(tmp_path / "logs")], stdout=open(out, "wb"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{aport}"
    try:
        wait_for(lambda: "llmrelay is up" in out.read_text(), 120, "llmrelay up")
        text = out.read_text()
        assert f"{api}/v1" in text and "curl" in text
        assert api_models(api) == {"smol", "smollm2", "gemma"}
        assert chat(api)
        auth = {"Authorization": "Bearer stack-secret"}
        assert httpx.get(f"http://127.0.0.1:{cport}/worker_table").status_code == 401
        table = httpx.get(f"http://127.0.0.1:{cport}/worker_table", headers=auth).json()
        assert table["dispatch_method"] == "lottery"
        assert (tmp_path / "logs" / "controller.log").exists()
        # a crashed child is restarted
        pid = httpx.post(f"http://127.0.0.1:{w1}/worker_get_status",
                         headers=auth).json()["llmrelay"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "restarting" in out.read_text(), 10, "the launcher to notice")
        wait_for(lambda: httpx.post(f"http://127.0.0.1:{w1}/worker_get_status", headers=auth)
                 .json()["llmrelay"]["pid"] != pid, 30, "the worker to come back")
        # on a loaded machine the restart can outlast 3 heartbeats: the controller then dropped
        # the worker, and the API lists `smol` again once it has re-registered
        wait_for(lambda: "smol" in api_models(api), 30, "smol back in the API")
        assert chat(api)
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)
    assert "llmrelay stopped" in out.read_text()
    for port in (cport, aport, w1, w2):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_worker_survives_reading_while_controller_down(procs: Procs) -> None:
    """A worker started while no controller exists still serves direct requests."""
    _, worker = procs.worker(f"http://127.0.0.1:{free_port()}", "smol")
    r = httpx.post(worker + "/worker_generate", json={"prompt": "Hi", "max_new_tokens": 2,
                                                      "echo": False})
    assert r.json()["error_code"] == 0

