"""FastChat's internal protocol: controller and worker endpoints, spoken over real HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx

from conftest import Procs, Stack, free_port, registered, wait_for

PROMPT = ("<|im_start|>user\nTell me a story about a dragon.<|im_end|>\n"
          "<|im_start|>assistant\n")


def test_controller_lists_and_addresses(stack: Stack) -> None:
    c = stack.controller
    assert httpx.get(c + "/test_connection").json() == "success"
    assert httpx.get(c + "/list_models").json() == {"models": ["gemma", "smol"]}  # GET (seed)
    assert httpx.post(c + "/list_models").json() == {"models": ["gemma", "smol"]}
    assert httpx.post(c + "/list_language_models").json()["models"] == ["gemma", "smol"]
    assert httpx.post(c + "/list_multimodal_models").json()["models"] == []
    addr = httpx.post(c + "/get_worker_address", json={"model": "smol"}).json()["address"]
    assert addr in stack.smol_workers
    assert httpx.post(c + "/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
    status = httpx.post(c + "/worker_get_status").json()
    assert status["model_names"] == ["gemma", "smol"] and status["speed"] == 3
    table = httpx.get(c + "/worker_table").json()
    assert table["dispatch_method"] == "shortest_queue"
    assert {w["name"] for w in table["workers"]} >= {*stack.smol_workers, stack.gemma_worker}
    for w in table["workers"]:
        assert {"model_names", "queue_length", "speed", "last_heart_beat"} <= set(w)


def test_registration_rules(stack: Stack) -> None:
    c = stack.controller
    # an unknown worker's heartbeat is told to register again
    r = httpx.post(c + "/receive_heart_beat", json={"worker_name": "http://127.0.0.1:1",
                                                    "queue_length": 0})
    assert r.json() == {"exist": False}
    # a registration whose address is not an http(s) URL is refused
    for bad in ["file:///etc/passwd", "gopher://x", "not a url", "", None]:
        r = httpx.post(c + "/register_worker", json={
            "worker_name": bad, "check_heart_beat": True,
            "worker_status": {"model_names": ["evil"], "speed": 1, "queue_length": 0}})
        assert r.status_code == 400, bad
        error = r.json()["error"]  # OpenAI's shape, all four fields
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    # without a status, the controller asks the worker itself (FastChat's behaviour)
    worker = stack.smol_workers[0]
    r = httpx.post(c + "/register_worker", json={"worker_name": worker, "check_heart_beat": True})
    assert r.status_code == 200
    assert registered(c, worker)
    # ... and a dead address without a status is refused, not stored
    dead = f"http://127.0.0.1:{free_port()}"
    r = httpx.post(c + "/register_worker", json={"worker_name": dead, "check_heart_beat": True})
    assert r.status_code == 400 and not registered(c, dead)


def test_controller_stream_proxy(stack: Stack) -> None:
    r = httpx.post(stack.controller + "/worker_generate_stream", json={
        "model": "smol", "prompt": PROMPT, "max_new_tokens": 4, "temperature": 0, "echo": False})
    frames = [json.loads(p) for p in r.content.split(b"\0") if p]
    assert frames[-1]["error_code"] == 0 and frames[-1]["text"], frames
    r = httpx.post(stack.controller + "/worker_generate_stream", json={"model": "nope"})
    frames = [json.loads(p) for p in r.content.split(b"\0") if p]
    assert frames == [{"text": frames[0]["text"], "error_code": 50005}]


def test_worker_stream_is_cumulative_nul_delimited(stack: Stack) -> None:
    w = stack.smol_workers[0]
    r = httpx.post(w + "/worker_generate_stream", json={
        "prompt": PROMPT, "max_new_tokens": 12, "temperature": 0, "echo": False,
        "stop": None, "logprobs": 1})
    assert r.content.endswith(b"\0")
    frames = [json.loads(p) for p in r.content.split(b"\0") if p]
    assert len(frames) > 2
    texts = [f["text"] for f in frames]
    for a, b in zip(texts, texts[1:], strict=False):
        assert b.startswith(a), "FastChat frames carry the whole text so far"
    last = frames[-1]
    assert last["finish_reason"] in ("stop", "length")
    assert all(f["finish_reason"] is None for f in frames[:-1])
    assert last["usage"]["completion_tokens"] <= 12
    assert last["usage"]["total_tokens"] == (last["usage"]["prompt_tokens"]
                                             + last["usage"]["completion_tokens"])
    lp = last["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    # the non-stream endpoint answers with the final frame
    one = httpx.post(w + "/worker_generate", json={
        "prompt": PROMPT, "max_new_tokens": 12, "temperature": 0, "echo": False}).json()
    assert one["text"] == last["text"] and one["error_code"] == 0
    # FastChat's worker echoes the prompt unless told not to
    echoed = httpx.post(w + "/worker_generate", json={
        "prompt": PROMPT, "max_new_tokens": 2, "temperature": 0}).json()
    assert echoed["text"].startswith(PROMPT)


def test_worker_small_endpoints(stack: Stack) -> None:
    w = stack.smol_workers[0]
    status = httpx.post(w + "/worker_get_status").json()
    assert status["model_names"] == ["smol"] and status["speed"] == 1
    assert status["queue_length"] >= 0
    assert "messages" in status["llmrelay"]["extensions"]
    assert httpx.post(w + "/model_details", json={"model": "smol"}).json() == {
        "context_length": 2048}
    count = httpx.post(w + "/count_token", json={"prompt": "Hello world"}).json()
    assert count["error_code"] == 0 and 1 <= count["count"] <= 4
    conv = httpx.post(w + "/worker_get_conv_template", json={"model": "smol"}).json()["conv"]
    assert {"name", "roles", "sep_style", "sep", "stop_str"} <= set(conv)
    bad = httpx.post(w + "/worker_generate", json={"prompt": 5})
    assert bad.status_code == 400 and bad.json()["error_code"] == 40001
    for path in ("/worker_generate", "/worker_generate_stream"):
        for body in (b'{"prompt": "hi",', b"[1, 2]", b"\xff\xfe"):
            r = httpx.post(w + path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error_code"] == 40001, (path, body)
            assert "JSON" in r.json()["text"]
    over = httpx.post(w + "/worker_generate", json={"prompt": "hi " * 3000, "echo": False})
    assert over.json()["error_code"] == 40303


def test_event_loop_stays_free_during_generation(procs: Procs) -> None:
    """A long generation must not block status or token counts (FastChat's CVE-2026-6607)."""
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol", extra=("--limit-worker-concurrency", "1"))
    started = threading.Event()

    def long_generation() -> None:
        with httpx.stream("POST", worker + "/worker_generate_stream", json={
                "prompt": PROMPT, "max_new_tokens": 400, "temperature": 0, "echo": False,
                "stop_token_ids": []}, timeout=120) as r:
            for _ in r.iter_raw():
                started.set()

    t = threading.Thread(target=long_generation, daemon=True)
    t.start()
    assert started.wait(30)
    worst = 0.0
    queue_seen = []
    for _ in range(10):
        t0 = time.monotonic()
        s = httpx.post(worker + "/worker_get_status", timeout=5).json()
        httpx.post(worker + "/count_token", json={"prompt": "hi"}, timeout=5)
        worst = max(worst, time.monotonic() - t0)
        queue_seen.append(s["queue_length"])
    assert 1 in queue_seen, "the running generation counts in the queue length"
    # Generous bound: these calls take milliseconds; a blocked loop would take seconds.
    assert worst < 2.0, f"status took {worst:.2f} s during a generation"
    t.join(120)


def test_concurrency_limit_queues_requests(procs: Procs) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol", extra=("--limit-worker-concurrency", "1"))
    results: list[dict] = []

    def ask() -> None:
        results.append(httpx.post(worker + "/worker_generate", json={
            "prompt": PROMPT, "max_new_tokens": 60, "temperature": 0, "echo": False,
            "stop_token_ids": []}, timeout=120).json())

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    peak = 0
    running_peak = 0
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        s = httpx.post(worker + "/worker_get_status").json()
        peak = max(peak, s["queue_length"])
        running_peak = max(running_peak, s["llmrelay"]["running"])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r["error_code"] == 0 for r in results)
    assert running_peak == 1
    assert peak >= 2, "waiting requests count in the queue length"
    wait_for(lambda: httpx.post(worker + "/worker_get_status").json()["queue_length"] == 0, 5)
