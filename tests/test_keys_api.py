"""API keys with names, model lists, limits and usage, through real processes: API servers of
their own (with a keys file and a data folder) in front of the session's workers.

The limits' windows are shortened with the API server's hidden `--limit-windows MINUTE,DAY`
flag (seconds; for tests only), so a limit can trip and recover within seconds.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Procs, Stack, free_port, wait_for
from llmrelay.api.keys import add_key, digest

Q = [{"role": "user", "content": "Hi"}]


def value(metrics: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return metrics.get((name, frozenset(labels.items())), 0.0)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def models_of(api: str, key: str) -> list[str]:
    r = httpx.get(api + "/v1/models", headers=bearer(key))
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


def keyed_api(procs: Procs, controller: str, keys: Path, data: Path, *extra: str,
              port: int | None = None) -> str:
    _, api = procs.api(controller, port=port, extra=("--api-keys-file", str(keys),
                                                     "--data-dir", str(data), *extra))
    return api


def complete(api: str, key: str, max_tokens: int = 1, **extra: Any) -> httpx.Response:
    return httpx.post(api + "/v1/completions", headers=bearer(key), timeout=60, json={
        "model": "smol", "prompt": "Once upon a time", "max_tokens": max_tokens,
        "temperature": 0, **extra})


def first_success(send: Callable[[], httpx.Response], timeout: float = 30) -> float:
    """Seconds until `send` first succeeds, retrying every 50 ms while it answers 429."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = send()
        if r.status_code == 200:
            return time.monotonic() - t0
        assert r.status_code == 429, r.text
        time.sleep(0.05)
    raise AssertionError(f"still refused after {timeout} s")


def check_retry_after(r: httpx.Response, waited: float) -> None:
    """Retry-After (whole seconds, rounded up) and retry-after-ms within ±20% of the wait."""
    ms = int(r.headers["retry-after-ms"])
    assert int(r.headers["Retry-After"]) == max(1, math.ceil(ms / 1000))
    for said in (ms / 1000, int(r.headers["Retry-After"])):
        assert abs(said - waited) <= 0.2 * waited, (said, waited)


# ---- keys file, model lists, reload, `llmrelay keys add` -------------------------------------


def test_hashed_keys_file_model_lists_and_changes_without_restart(stack: Stack, procs: Procs,
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    alice = add_key(path, "alice", models=["smol"])
    api = keyed_api(procs, stack.controller, path, tmp_path / "data")
    wait_for(lambda: models_of(api, alice) == ["smol"], 30, "alice's models")
    assert httpx.get(api + "/v1/models", headers=bearer("sk-wrong")).status_code == 401
    assert httpx.get(api + "/v1/models").status_code == 401

    # `llmrelay keys add` prints the key once and stores only its hash; the server picks it up
    out = subprocess.run([sys.executable, "-m", "llmrelay.cli", "keys", "add", "bob", "--file",
                          str(path), "--models", "gem*", "--priority", "batch"],
                         capture_output=True, text=True, timeout=30, check=True)
    bob = out.stdout.strip()
    assert bob.startswith("sk-") and "not shown again" in out.stderr
    text = path.read_text()
    assert bob not in text and digest(bob) in text and alice not in text
    wait_for(lambda: httpx.get(api + "/v1/models", headers=bearer(bob)).status_code == 200, 10,
             "the new key to be read")
    assert models_of(api, bob) == ["gemma"]

    # a model the key may not use is a 404 exactly like a model nobody serves
    def chat(key: str, model: str) -> httpx.Response:
        return httpx.post(api + "/v1/chat/completions", headers=bearer(key), timeout=60,
                          json={"model": model, "messages": Q, "max_tokens": 1})

    hidden, missing = chat(alice, "gemma"), chat(alice, "gemmu")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"] == missing.json()["error"]["message"].replace(
        "gemmu", "gemma")
    assert hidden.json()["error"]["code"] == "model_not_found"
    assert "smol" in hidden.json()["error"]["message"]
    assert httpx.get(api + "/v1/models/gemma", headers=bearer(alice)).status_code == 404
    assert httpx.get(api + "/v1/models/smol", headers=bearer(alice)).status_code == 200
    assert chat(bob, "smol").status_code == 404
    assert chat(bob, "gemma").status_code == 200
    assert httpx.post(api + "/v1/embeddings", headers=bearer(alice),
                      json={"model": "gemma", "input": "x"}).status_code == 404
    # the other front doors too, with the key as Anthropic's x-api-key where that API takes it
    for path_, body, headers in [
            ("/v1/responses", {"model": "gemma", "input": "hi", "max_output_tokens": 1},
             bearer(alice)),
            ("/v1/messages", {"model": "gemma", "max_tokens": 1, "messages": Q},
             {"x-api-key": alice}),
            ("/v1/messages/count_tokens", {"model": "gemma", "messages": Q}, {"x-api-key": alice}),
            ("/tokenize", {"model": "gemma", "prompt": "hi"}, bearer(alice))]:
        r = httpx.post(api + path_, headers=headers, json=body, timeout=60)
        assert r.status_code == 404, (path_, r.text)
        assert "smol" in r.text, (path_, r.text)  # it names the models the key may use
    assert httpx.post(api + "/v1/messages", headers={"x-api-key": alice}, timeout=60, json={
        "model": "smol", "max_tokens": 1, "messages": Q}).status_code == 200

    # editing the file changes a key's models; removing a key ends it: no restart
    path.write_text(text.replace('models = ["smol"]', 'models = ["smol", "gemma"]'))
    wait_for(lambda: models_of(api, alice) == ["gemma", "smol"], 10, "alice's new models")
    assert chat(alice, "gemma").status_code == 200
    path.write_text(path.read_text().split("[keys.bob]")[0])
    wait_for(lambda: httpx.get(api + "/v1/models", headers=bearer(bob)).status_code == 401, 10,
             "bob's key to end")
    for p in procs.all:
        assert alice not in p.log() and bob not in p.log()


# ---- limits: each trips at its number and recovers after its window ---------------------------

MINUTE, DAY = 10.0, 14.0  # the windows' lengths for these tests (--limit-windows)


@dataclass
class Limited:
    api: str
    keys: dict[str, str]


@pytest.fixture(scope="module")
def limited(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    d = tmp_path_factory.mktemp("limits")
    path = d / "keys.toml"
    keys = {name: add_key(path, name, **limits) for name, limits in {  # type: ignore[arg-type]
        "rpm": {"requests_per_minute": 3}, "tpm": {"tokens_per_minute": 20},
        "conc": {"concurrent": 2}, "tpd": {"tokens_per_day": 20}}.items()}
    procs = Procs(d)
    try:
        api = keyed_api(procs, stack.controller, path, d / "data", "--limit-windows",
                        f"{MINUTE},{DAY}")
        wait_for(lambda: "smol" in models_of(api, keys["rpm"]), 30, "smol in the API")
        yield Limited(api, keys)
    finally:
        procs.stop_all()


def test_requests_per_minute(limited: Limited) -> None:
    key = limited.keys["rpm"]
    for _ in range(3):
        assert complete(limited.api, key).status_code == 200
    r = complete(limited.api, key)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
    assert "requests per min" in err["message"] and "Limit 3" in err["message"]
    # the openai SDK sees a RateLimitError
    client = openai.OpenAI(base_url=limited.api + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="smol", prompt="x", max_tokens=1)
    check_retry_after(r, first_success(lambda: complete(limited.api, key)))


def test_tokens_per_minute(limited: Limited) -> None:
    key = limited.keys["tpm"]
    used: list[int] = []
    while True:
        r = complete(limited.api, key, max_tokens=8)
        if r.status_code == 429:
            break
        assert r.status_code == 200 and len(used) < 10
        used.append(r.json()["usage"]["total_tokens"])
    assert sum(used) >= 20 > sum(used[:-1])  # refused once the answers reached the limit
    err = r.json()["error"]
    assert err["type"] == "tokens" and "tokens per min" in err["message"]
    check_retry_after(r, first_success(lambda: complete(limited.api, key)))


def test_tokens_per_day(limited: Limited) -> None:
    key = limited.keys["tpd"]
    used: list[int] = []
    while (r := complete(limited.api, key, max_tokens=8)).status_code == 200:
        used.append(r.json()["usage"]["total_tokens"])
        assert len(used) < 10
    assert sum(used) >= 20 > sum(used[:-1])
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    assert "tokens per day" in r.json()["error"]["message"]
    # the minute window (10 s) passes; the day's (14 s) still holds
    assert int(r.headers["retry-after-ms"]) > MINUTE * 1000 * 0.5
    check_retry_after(r, first_success(lambda: complete(limited.api, key)))


def test_requests_at_once(limited: Limited) -> None:
    key = limited.keys["conc"]
    body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
        streams, lines = [], []
        for c in (c1, c2):
            s = c.stream("POST", limited.api + "/v1/completions", headers=bearer(key), json=body)
            r = s.__enter__()
            assert r.status_code == 200
            lines.append(r.iter_lines())  # kept: a line iterator let go closes the stream
            next(lines[-1])  # generating
            streams.append(s)
        r = complete(limited.api, key)
        assert r.status_code == 429 and r.json()["error"]["type"] == "concurrent"
        assert "at once" in r.json()["error"]["message"] and r.headers["Retry-After"] == "1"
        streams[0].__exit__(None, None, None)  # one of them ends (the client leaves)
        assert first_success(lambda: complete(limited.api, key), timeout=10) < 5
        streams[1].__exit__(None, None, None)


# ---- usage: exactly the answers' usage, kept across restarts ---------------------------------


def test_usage_matches_the_answers_and_survives_a_restart(stack: Stack, procs: Procs,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    admin = add_key(path, "ops", admin=True)
    alice = add_key(path, "alice")
    data = tmp_path / "data"
    port = free_port()
    api = keyed_api(procs, stack.controller, path, data, port=port)
    wait_for(lambda: set(models_of(api, alice)) == {"smol", "gemma"}, 30, "the models")
    expected: dict[tuple[str, str], list[int]] = {}

    def add(key: str, model: str, usage: Any) -> None:
        row = expected.setdefault((key, model), [0, 0, 0])
        row[0] += 1
        row[1] += usage.prompt_tokens
        row[2] += usage.completion_tokens

    client = openai.OpenAI(base_url=api + "/v1", api_key=alice, max_retries=0, timeout=120)
    r = client.chat.completions.create(model="smol", messages=Q, max_tokens=5, n=2)
    add("alice", "smol", r.usage)
    usage = None
    for chunk in client.chat.completions.create(
            model="gemma", messages=Q, max_tokens=6, stream=True,
            stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    add("alice", "gemma", usage)
    r2 = client.completions.create(model="smol", prompt=["One", "Two words"], max_tokens=4, n=2)
    add("alice", "smol", r2.usage)
    for chunk in client.completions.create(model="smol", prompt="Hello", max_tokens=7,
                                           stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    add("alice", "smol", usage)
    ops = openai.OpenAI(base_url=api + "/v1", api_key=admin, max_retries=0, timeout=120)
    add("ops", "gemma", ops.chat.completions.create(model="gemma", messages=Q,
                                                     max_tokens=3).usage)

    def report(**query: str) -> list[tuple[str, str, int, int, int]]:
        r = httpx.get(api + "/v1/usage", headers=bearer(admin), params=query)
        r.raise_for_status()
        return sorted((x["key"], x["model"], x["requests"], x["prompt_tokens"],
                       x["completion_tokens"]) for x in r.json()["data"])

    want = sorted((k, m, *v) for (k, m), v in expected.items())
    assert report() == want
    assert report(key="alice") == [w for w in want if w[0] == "alice"]
    assert report(since="2999-01-01") == []
    r = httpx.get(api + "/v1/usage", headers=bearer(alice))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions"
    metrics = scrape_keyed(api, admin)
    for k, m, _, prompt, completion in want:
        assert value(metrics, "llmrelay_api_key_prompt_tokens_total", key=k, model=m) == prompt
        assert value(metrics, "llmrelay_api_key_completion_tokens_total", key=k,
                     model=m) == completion

    # `llmrelay usage` prints the same as a table
    out = subprocess.run([sys.executable, "-m", "llmrelay.cli", "usage", "--base-url",
                          api + "/v1", "--api-key", admin], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["DAY", "KEY", "MODEL"]
    total = sum(p + c for *_, p, c in want)
    assert lines[-1].split() == ["total", str(sum(w[2] for w in want)),
                                 str(sum(w[3] for w in want)), str(sum(w[4] for w in want)),
                                 str(total)]
    refused = subprocess.run([sys.executable, "-m", "llmrelay.cli", "usage", "--base-url", api,
                              "--api-key", alice], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "403" in refused.stderr

    # the server's log says where usage is kept; a restart keeps it
    server = procs.all[-1]
    assert str(data / "usage.sqlite") in server.log()
    server.stop()
    api = keyed_api(procs, stack.controller, path, data, port=port)
    assert report() == want


def scrape_keyed(api: str, key: str) -> dict:  # type: ignore[type-arg]
    """The API server's metrics (behind its keys), as test_observability.scrape reads them."""
    r = httpx.get(api + "/metrics", headers=bearer(key))
    r.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


# ---- fair sharing on the worker, fed by the keys' names ----------------------------------------


@pytest.mark.parametrize("fair", ["on", "off"])
def test_a_flooding_key_does_not_starve_another_on_a_full_worker(
        stack: Stack, procs: Procs, tmp_path: Path, fair: str) -> None:
    """One place on the worker: key A queues five requests, then B one; B runs right after
    the request running then (or the next), not after A's whole queue (which `--fair-sharing
    off` does)."""
    _, worker = procs.worker(stack.controller, f"fair-{fair}",
                             extra=("--limit-worker-concurrency", "1", "--fair-sharing", fair))
    status = httpx.post(worker + "/worker_get_status").json()["llmrelay"]
    assert status["fair_sharing"] is (fair == "on")
    path = tmp_path / "keys.toml"
    model = f"fair-{fair}"
    a, b = add_key(path, "a", models=[model]), add_key(path, "b", models=[model])
    api = keyed_api(procs, stack.controller, path, tmp_path / "data")
    wait_for(lambda: models_of(api, a) == [model], 30, "the worker in the API")
    done: list[str] = []

    async def flood() -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            async def one(key: str, name: str) -> None:
                r = await c.post(api + "/v1/completions", headers=bearer(key), json={
                    "model": model, "prompt": "Once upon a time", "max_tokens": 24,
                    "temperature": 0})
                assert r.status_code == 200, r.text
                done.append(name)

            tasks = [asyncio.create_task(one(a, f"a{i}")) for i in range(5)]
            # B comes once A's requests wait on the worker (at least three behind the one
            # running): then B must run next, or right after the next, whatever the speed.
            def queued() -> bool:
                status = httpx.post(worker + "/worker_get_status").json()
                return status["queue_length"] - status["llmrelay"]["running"] >= 3

            await asyncio.to_thread(wait_for, queued, 30, "A's requests to wait on the worker")
            tasks.append(asyncio.create_task(one(b, "b")))
            await asyncio.gather(*tasks)

    asyncio.run(flood())
    if fair == "on":
        assert done.index("b") <= 2, done
    else:
        assert done[-1] == "b", done  # first come, first served
