"""A client that leaves before the first token (the web chat's Stop pressed early, a client
timeout during a long prompt) must still stop the generation on the worker."""

from __future__ import annotations

import uuid

import httpx
import pytest

from conftest import Stack, wait_for


def running(stack: Stack) -> int:
    return sum(httpx.post(w + "/worker_get_status").json()["llmrelay"]["running"]
               for w in stack.smol_workers)


def cancelled(stack: Stack) -> float:
    total = 0.0
    for url in stack.smol_workers:
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith("llmrelay_worker_requests_total{") and 'status="cancelled"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("stream", [False, True])
def test_leaving_before_the_first_token_stops_the_worker(stack: Stack, stream: bool) -> None:
    before = cancelled(stack)
    # A long prompt: its prefill alone takes longer than the client waits.
    # (Its start differs per run, so no worker has it cached.)
    prompt = uuid.uuid4().hex + " " + " ".join(f"item {i}," for i in range(250))
    body = {"model": "smol", "prompt": prompt, "max_tokens": 1500, "temperature": 0,
            "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", stack.api + "/v1/completions", json=body,
                          timeout=httpx.Timeout(0.3, connect=5)) as r:
            for line in r.iter_lines():
                assert not line.startswith("data: {"), "the first token came before the timeout"
    # Without cancellation it would run for its 1500 tokens and count as `ok`.
    wait_for(lambda: cancelled(stack) == before + 1, 20, "the worker to cancel the generation")
    wait_for(lambda: running(stack) == 0, 10, "the worker to be idle")
