"""Prometheus metrics after real traffic, request ids in both logs, and `llmrelay status`."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Procs, Stack, free_port, wait_for
from llmrelay.protocol import OUR_EXTENSIONS


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return m.get((name, frozenset(labels.items())), 0.0)


def total(ms: list[dict], name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return sum(value(m, name, **labels) for m in ms)


def test_metrics_move_by_the_traffic_sent(stack: Stack, client: openai.OpenAI) -> None:
    api0 = scrape(stack.api)
    workers0 = [scrape(w) for w in stack.smol_workers]
    ctl0 = scrape(stack.controller)

    prompt = completion = 0
    for i in range(2):
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=8, temperature=0)
        prompt += r.usage.prompt_tokens
        completion += r.usage.completion_tokens
    stream = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Say something."}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            prompt += chunk.usage.prompt_tokens
            completion += chunk.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])

    api1 = scrape(stack.api)
    workers1 = [scrape(w) for w in stack.smol_workers]
    chat = "/v1/chat/completions"
    assert (value(api1, "llmrelay_api_requests_total", endpoint=chat, model="smol", status="200")
            - value(api0, "llmrelay_api_requests_total", endpoint=chat, model="smol",
                    status="200")) == 3
    # A name nobody serves is never a label value: it is counted under the empty model.
    assert (value(api1, "llmrelay_api_requests_total", endpoint=chat, model="", status="404")
            - value(api0, "llmrelay_api_requests_total", endpoint=chat, model="",
                    status="404")) == 1
    assert not any("no-such-model" in str(k) for k in api1)
    for name, expected in (("llmrelay_api_prompt_tokens_total", prompt),
                           ("llmrelay_api_completion_tokens_total", completion)):
        assert value(api1, name, model="smol") - value(api0, name, model="smol") == expected
    for name in ("llmrelay_api_time_to_first_token_seconds_count",):
        assert value(api1, name, model="smol") - value(api0, name, model="smol") == 3
    assert (value(api1, "llmrelay_api_request_duration_seconds_count", endpoint=chat,
                  model="smol")
            - value(api0, "llmrelay_api_request_duration_seconds_count", endpoint=chat,
                    model="smol")) == 3
    assert value(api1, "llmrelay_api_workers_alive", model="smol") == 2
    assert value(api1, "llmrelay_api_workers_alive", model="gemma") == 1
    assert value(api1, "llmrelay_api_queue_length", model="smol") >= 0

    # The workers saw the same requests and tokens.
    assert (total(workers1, "llmrelay_worker_requests_total", model="smol", status="ok")
            - total(workers0, "llmrelay_worker_requests_total", model="smol", status="ok")) == 3
    assert (total(workers1, "llmrelay_worker_prompt_tokens_total", model="smol")
            - total(workers0, "llmrelay_worker_prompt_tokens_total", model="smol")) == prompt
    assert (total(workers1, "llmrelay_worker_completion_tokens_total", model="smol")
            - total(workers0, "llmrelay_worker_completion_tokens_total", model="smol")) == completion
    assert (total(workers1, "llmrelay_worker_time_to_first_token_seconds_count", model="smol")
            - total(workers0, "llmrelay_worker_time_to_first_token_seconds_count",
                    model="smol")) == 3
    assert total(workers1, "llmrelay_worker_queue_length") == 0

    # The controller: three workers alive, registered once each, heartbeating.
    wait_for(lambda: value(scrape(stack.controller), "llmrelay_controller_heartbeats_total",
                           known="true")
             > value(ctl0, "llmrelay_controller_heartbeats_total", known="true"), 10,
             "heartbeats to be counted")
    ctl1 = scrape(stack.controller)
    assert value(ctl1, "llmrelay_controller_workers_alive") == 3
    assert value(ctl1, "llmrelay_controller_model_workers", model="smol") == 2
    assert value(ctl1, "llmrelay_controller_registrations_total", kind="new") >= 3


def test_failover_and_registrations_are_counted(stack: Stack, procs: Procs) -> None:
    """A worker address that refuses connections (a real dead port) is tried first; the request
    moves to a live worker and the API server counts one failover."""
    _, controller = procs.controller()
    live = stack.smol_workers[0]
    status = httpx.post(live + "/worker_get_status").json()
    status["queue_length"] = 5  # so the dead worker (queue 0) is picked first
    dead = f"http://127.0.0.1:{free_port()}"
    for name, st in ((live, status), (dead, {"model_names": ["smol"], "speed": 1,
                                             "queue_length": 0,
                                             "llmrelay": {"extensions": OUR_EXTENSIONS}})):
        r = httpx.post(controller + "/register_worker",
                       json={"worker_name": name, "worker_status": st, "check_heart_beat": False})
        assert r.status_code == 200
    _, api = procs.api(controller)
    wait_for(lambda: value(scrape(api), "llmrelay_api_workers_alive", model="smol") == 2, 10,
             "both workers in the API's table")
    c = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=4)
    assert r.choices[0].message.content is not None
    m = scrape(api)
    assert value(m, "llmrelay_api_failovers_total", model="smol") == 1
    assert value(m, "llmrelay_api_requests_total", endpoint="/v1/chat/completions",
                 model="smol", status="200") == 1
    assert value(m, "llmrelay_api_workers_alive", model="smol") == 1  # the dead one is out
    ctl = scrape(controller)
    assert value(ctl, "llmrelay_controller_registrations_total", kind="new") == 2
    assert value(ctl, "llmrelay_controller_workers_alive") == 2
    ops = httpx.get(api + "/api/workers").json()
    health = {w["address"]: w["health"] for w in ops["workers"]}
    assert health == {live: "no heartbeat", dead: "refused connection"}


def logs_of(stack: Stack, prefix: str) -> str:
    return "".join(p.log() for p in stack.procs.all if p.name.startswith(prefix))


@pytest.mark.parametrize("stream", [False, True])
def test_request_id_is_returned_and_logged_by_api_and_worker(stack: Stack, stream: bool) -> None:
    rid = f"rid-{uuid.uuid4().hex[:12]}"
    r = httpx.post(stack.api + "/v1/chat/completions", headers={"X-Request-ID": rid}, json={
        "model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "stream": stream}, timeout=120)
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    wait_for(lambda: f"request {rid}:" in logs_of(stack, "api-"), 10, "the API server's log line")
    wait_for(lambda: f"request {rid}:" in logs_of(stack, "worker-smol"), 10,
             "the worker's log line")
    line = next(x for x in logs_of(stack, "api-").splitlines() if f"request {rid}:" in x)
    assert "POST /v1/chat/completions model=smol -> 200" in line


def test_made_up_request_id_is_logged_too(stack: Stack) -> None:
    r = httpx.post(stack.api + "/v1/chat/completions", headers={"X-Request-ID": "bad id<>"},
                   json={"model": "smol", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 2}, timeout=120)
    rid = r.headers["x-request-id"]
    assert rid != "bad id<>" and rid.isalnum()
    wait_for(lambda: f"request {rid}:" in logs_of(stack, "api-")
             and f"request {rid}:" in logs_of(stack, "worker-smol"), 10, "both log lines")


def run_status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmrelay.cli", "status", *args],
                          capture_output=True, text=True, timeout=60)


def test_status_prints_the_worker_table(stack: Stack) -> None:
    out = run_status("--controller-address", stack.controller)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "3 workers, 2 models (gemma, smol)" in lines[0]
    assert lines[1].split() == ["MODELS", "ADDRESS", "ENGINE", "QUEUE", "RUNNING", "SERVED",
                                "SPEED", "LAST", "BEAT", "HEALTH"]
    rows = {line.split()[1]: line.split() for line in lines[2:]}
    assert set(rows) == {*stack.smol_workers, stack.gemma_worker}
    for url, row in rows.items():
        assert row[0] == ("gemma" if url == stack.gemma_worker else "smol")
        assert row[2] == "llamacpp" and row[3].isdigit() and row[-1] == "ok"
        assert row[-3:-1] == ["s", "ago"] and float(row[-4]) >= 0


def test_status_says_when_the_controller_is_unreachable() -> None:
    out = run_status("--controller-address", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "not reachable" in out.stderr


def test_metrics_and_table_need_the_key_when_keys_are_set(stack: Stack, procs: Procs) -> None:
    _, api = procs.api(stack.controller, extra=("--api-keys", "sk-ops"))
    assert httpx.get(api + "/metrics").status_code == 401
    assert httpx.get(api + "/api/workers").status_code == 401
    auth = {"Authorization": "Bearer sk-ops"}
    assert httpx.get(api + "/metrics", headers=auth).status_code == 200
    table = httpx.get(api + "/api/workers", headers=auth).json()
    assert {w["address"] for w in table["workers"]} == {*stack.smol_workers, stack.gemma_worker}
    assert table["source"] == stack.controller
