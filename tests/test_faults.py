"""Faults, with real processes: full queues, slow queues through proxies, timeouts, huge bodies,
workers killed or frozen under load, SIGTERM during streams. Each test checks what the client
saw and that nothing hung."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import Procs, api_models, registered, wait_for

COUNT = {"model": "smol", "prompt": "1, 2, 3, 4, 5,", "temperature": 0}


def long_stream(api: str, max_tokens: int = 400, started: threading.Event | None = None
                ) -> dict:
    """Stream a long completion; returns what the client saw."""
    seen: dict = {"text": "", "events": [], "status": None, "comments": 0}
    with httpx.stream("POST", api + "/v1/completions", timeout=120, json={
            **COUNT, "max_tokens": max_tokens, "stream": True}) as r:
        seen["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith(":"):
                seen["comments"] += 1
            elif line.startswith("data: "):
                data = line[6:]
                seen["events"].append(data)
                if data != "[DONE]":
                    obj = json.loads(data)
                    if "choices" in obj and obj["choices"]:
                        seen["text"] += obj["choices"][0]["text"]
                    if started is not None:
                        started.set()
    return seen


def test_full_workers_answer_429(procs: Procs) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol", extra=(
        "--limit-worker-concurrency", "1", "--max-queue", "0"))
    _, api = procs.api(controller)
    wait_for(lambda: "smol" in api_models(api), 15)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(long_stream, api, 300, started)
        assert started.wait(30)
        client = openai.OpenAI(base_url=api + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(**COUNT, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "rate_limit_exceeded"
        assert busy.result()["events"][-1] == "[DONE]"
    # once the worker is free again, requests succeed
    assert client.completions.create(**COUNT, max_tokens=2).choices[0].text


def test_queued_stream_gets_keepalives_then_its_answer(procs: Procs) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol", extra=("--limit-worker-concurrency", "1"))
    _, api = procs.api(controller, extra=("--sse-keepalive", "0.3"))
    wait_for(lambda: "smol" in api_models(api), 15)
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(long_stream, api, 400, started)
        assert started.wait(30)
        second = pool.submit(long_stream, api, 5)
        queued = second.result(timeout=120)
        assert first.result(timeout=120)["events"][-1] == "[DONE]"
    assert queued["status"] == 200
    assert queued["comments"] >= 1, "a waiting stream must send keep-alive comments"
    assert queued["text"] and queued["events"][-1] == "[DONE]"


def test_request_timeout(procs: Procs) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol")
    _, api = procs.api(controller, extra=("--request-timeout", "1.5"))
    wait_for(lambda: "smol" in api_models(api), 15)
    t0 = time.monotonic()
    r = httpx.post(api + "/v1/completions", json={**COUNT, "max_tokens": 2000}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    seen = long_stream(api, 2000)
    assert time.monotonic() - t0 < 30, "nothing may hang past the timeout"
    assert json.loads(seen["events"][-2])["error"]["code"] == "timeout"
    assert seen["events"][-1] == "[DONE]"
    # the worker stopped generating for both
    wait_for(lambda: httpx.post(worker + "/worker_get_status").json()["llmrelay"]["running"] == 0,
             5, "the worker to stop")


def test_huge_bodies_get_413(procs: Procs) -> None:
    _, controller = procs.controller()
    _, api = procs.api(controller, extra=("--max-request-bytes", "100000"))
    big = {"model": "smol", "messages": [{"role": "user", "content": "x" * 200_000}]}
    r = httpx.post(api + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]["message"]

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 10_000):
            yield data[i:i + 10_000]

    r = httpx.post(api + "/v1/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_ten_megabyte_prompt_is_4xx(procs: Procs) -> None:
    _, controller = procs.controller()
    _, api = procs.api(controller)
    r = httpx.post(api + "/v1/completions", json={"model": "smol", "prompt": "a" * 10_000_000},
                   timeout=60)
    assert r.status_code == 413


def whole(api: str, max_tokens: int) -> httpx.Response:
    return httpx.post(api + "/v1/completions", json={**COUNT, "max_tokens": max_tokens},
                      timeout=120)


def test_worker_killed_under_load(procs: Procs) -> None:
    """kill -9 one of two workers while streams run: no client hangs, none is cut silently;
    non-streamed requests on the killed worker are answered by the other one."""
    _, controller = procs.controller()
    w1, url1 = procs.worker(controller, "smol")
    _, url2 = procs.worker(controller, "smol")
    _, api = procs.api(controller)
    wait_for(lambda: registered(controller, url1) and registered(controller, url2), 15)
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(long_stream, api, 150) for _ in range(6)]
        answers = [pool.submit(whole, api, 150) for _ in range(4)]
        time.sleep(1.0)
        assert httpx.post(url1 + "/worker_get_status").json()["llmrelay"]["running"] > 0
        w1.kill()
        results = [f.result(timeout=120) for f in futures]
        for a in answers:
            r = a.result(timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == 150
        after = [pool.submit(long_stream, api, 5) for _ in range(4)]
        later = [f.result(timeout=120) for f in after]
    for seen in results + later:
        assert seen["events"][-1] == "[DONE]", "every stream ends with [DONE]"
        last = json.loads(seen["events"][-2])
        if "error" in last:
            assert last["error"]["message"], "a cut stream says why"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert all("error" not in json.loads(s["events"][-2]) for s in later), \
        "after the kill, requests go to the live worker"


def test_frozen_worker_is_dropped(procs: Procs) -> None:
    """A worker that stops answering (SIGSTOP) misses heartbeats and leaves the table;
    requests then go to the other worker."""
    _, controller = procs.controller()
    w1, url1 = procs.worker(controller, "smol")
    _, url2 = procs.worker(controller, "smol")
    _, api = procs.api(controller, extra=("--request-timeout", "6"))
    wait_for(lambda: registered(controller, url1) and registered(controller, url2), 15)
    assert w1.proc is not None
    # a stream in flight on the worker when it freezes ends with a timeout error, not a hang
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(long_stream, api, 1500) for _ in range(4)]
        time.sleep(1.0)
        w1.proc.send_signal(signal.SIGSTOP)
        results = [f.result(timeout=60) for f in streams]
    timeouts = [r for r in results if "error" in json.loads(r["events"][-2])]
    assert timeouts, "the streams on the frozen worker must end with an error"
    for r in timeouts:
        assert json.loads(r["events"][-2])["error"]["code"] == "timeout"
        assert r["events"][-1] == "[DONE]"
    try:
        wait_for(lambda: not registered(controller, url1), 10, "the frozen worker to expire")
        time.sleep(1.0)  # one API table refresh
        for _ in range(4):
            seen = long_stream(api, 4)
            assert "error" not in json.loads(seen["events"][-2])
    finally:
        w1.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: registered(controller, url1), 10, "the thawed worker to come back")


def test_sigterm_on_worker_during_streams(procs: Procs) -> None:
    """SIGTERM: the worker deregisters at once, finishes its running streams, and exits;
    new requests go to the other worker."""
    _, controller = procs.controller()
    workers = {}  # url -> Proc
    for _ in range(2):
        proc, url = procs.worker(controller, "smol")
        workers[url] = proc
    _, api = procs.api(controller)
    wait_for(lambda: all(registered(controller, u) for u in workers), 15)
    with ThreadPoolExecutor(4) as pool:
        started = [threading.Event() for _ in range(4)]
        futures = [pool.submit(long_stream, api, 120, e) for e in started]
        assert all(e.wait(60) for e in started), "the streams never started"
        # every stream is under way (120 tokens each, only the first came): stop the busier
        running = {u: httpx.post(u + "/worker_get_status").json()["llmrelay"]["running"]
                   for u in workers}
        url1 = max(running, key=running.__getitem__)
        w1 = workers[url1]
        assert running[url1] > 0 and w1.proc is not None
        w1.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not registered(controller, url1), 3, "deregistration on SIGTERM")
        results = [f.result(timeout=120) for f in futures]
    for seen in results:
        assert seen["events"][-1] == "[DONE]"
        last = json.loads(seen["events"][-2])
        assert "error" not in last, "running streams finish during a graceful shutdown"
        assert last["choices"][0]["finish_reason"] == "length"
    w1.proc.wait(30)
    assert "deregistered" in w1.log()
    assert "engine llamacpp closed" in w1.log(), "the engine is freed before the process exits"
    assert "error" not in json.loads(long_stream(api, 4)["events"][-2])


def test_controller_restart_under_load(procs: Procs) -> None:
    cproc, controller = procs.controller()
    port = int(controller.rsplit(":", 1)[1])
    _, w = procs.worker(controller, "smol")
    _, api = procs.api(controller)
    wait_for(lambda: "smol" in api_models(api), 15)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(long_stream, api, 60) for _ in range(8)]
        time.sleep(0.3)
        cproc.kill()
        time.sleep(1.0)
        procs.controller(port)
        results = [f.result(timeout=120) for f in futures]
    for seen in results:
        assert seen["events"][-1] == "[DONE]"
        assert "error" not in json.loads(seen["events"][-2])
    wait_for(lambda: registered(controller, w), 10)


def test_refused_worker_leaves_rotation_and_returns(procs: Procs) -> None:
    """Passive health: a worker that refuses connections is skipped at once, and is used again
    after it comes back and heartbeats."""
    _, controller = procs.controller()
    w1, url1 = procs.worker(controller, "smol")
    _, url2 = procs.worker(controller, "smol")
    aproc, api = procs.api(controller)
    wait_for(lambda: registered(controller, url1) and registered(controller, url2), 15)
    w1.kill()
    # Ties between the two idle workers are broken at random: send until one request has been
    # sent to the dead worker (each one must still succeed, on the other worker).
    for _ in range(12):
        assert "error" not in json.loads(long_stream(api, 2)["events"][-2])
        if "out of rotation" in aproc.log():
            break
    assert "out of rotation" in aproc.log()
    port = url1.rsplit(":", 1)[1]
    procs.worker(controller, "smol", port=int(port))

    def served_by_w1() -> bool:
        long_stream(api, 2)
        return httpx.post(url1 + "/worker_get_status").json()["llmrelay"]["served"] > 0

    wait_for(served_by_w1, 20, "the restarted worker to get traffic again")


def test_sigterm_on_api_server_drains_streams(procs: Procs) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol")
    aproc, api = procs.api(controller)
    wait_for(lambda: "smol" in api_models(api), 15)
    with ThreadPoolExecutor(2) as pool:
        started = [threading.Event() for _ in range(2)]
        futures = [pool.submit(long_stream, api, 150, e) for e in started]
        assert all(e.wait(60) for e in started), "the streams never started"
        assert aproc.proc is not None
        aproc.proc.send_signal(signal.SIGTERM)  # both streams under way
        results = [f.result(timeout=120) for f in futures]
    for seen in results:
        assert seen["events"][-1] == "[DONE]"
        assert json.loads(seen["events"][-2])["choices"][0]["finish_reason"] == "length"
    assert aproc.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    with pytest.raises(httpx.ConnectError):
        httpx.get(api + "/health")
