"""Access rules without a server: authentication to a named key, model allow-lists answered as
404s, limits as 429s with Retry-After, the accounting when an answer ends (limits, usage store,
per-key metrics), the usage report for admins, the key's name and priority sent only to workers
that announce fair sharing, and the accounting done before the answer's last bytes."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmrelay.api.access import Access, allowed_models
from llmrelay.api.errors import APIError
from llmrelay.api.keys import Key, KeyStore, add_key
from llmrelay.api.limits import Limiter, LocalLimits
from llmrelay.api.observe import ObserveMiddleware, RequestRecord, _current, note_billed
from llmrelay.api.plan import Caller
from llmrelay.api.table import WorkerTable
from llmrelay.api.transport import WorkerTransport
from llmrelay.api.usage import UsageStore, utc_day
from llmrelay.metrics import ApiMetrics
from llmrelay.protocol import EXT_FAIRNESS, OUR_EXTENSIONS


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def worker(name: str, models: list[str], extensions: list[str] | None = None,
           fastchat: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"model_names": models, "speed": 1, "queue_length": 0}
    if not fastchat:
        status["llmrelay"] = {"extensions": OUR_EXTENSIONS if extensions is None else extensions}
    return {"name": name, "model_names": models, "speed": 1, "queue_length": 0,
            "last_heart_beat": 1.0, "registered_at": 1.0, "status": status}


def table(*entries: dict[str, Any]) -> WorkerTable:
    t = WorkerTable(["http://controller"], rng=random.Random(0))
    t.apply({"workers": list(entries) or [worker("http://w1", ["smol", "gemma"])]})
    return t


def value(metrics: ApiMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_authentication_names_the_key_and_refuses_others(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    secret = add_key(path, "alice")
    access = Access(KeyStore(["sk-plain"], path))
    assert access.enabled
    assert access.authenticate(f"Bearer {secret}").name == "alice"
    plain = access.authenticate("bearer sk-plain")
    assert plain.name == "key-1" and plain.admin and not plain.limited
    for header in ("", "Bearer", "Basic " + secret, "Bearer sk-wrong"):
        with pytest.raises(APIError) as e:
            access.authenticate(header)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
    assert not Access(KeyStore()).enabled


def test_a_model_the_key_may_not_use_is_a_404_as_if_it_did_not_exist() -> None:
    t = table()
    access = Access(KeyStore())
    key = Key("alice", models=("smol*",))

    async def refused(model: str) -> APIError:
        with pytest.raises(APIError) as e:
            await access.enter(key, model, t)
        return e.value

    async def main() -> None:
        await access.enter(key, "smol", t)
        hidden, missing = await refused("gemma"), await refused("gemmu")
        assert hidden.status == missing.status == 404
        assert hidden.body() == {"error": {**missing.body()["error"], "message": missing.message
                                           .replace("gemmu", "gemma")}}
        assert "gemma" not in hidden.message.replace("'gemma'", "")  # never listed
        assert "smol" in hidden.message
        await access.enter(None, "gemma", t)  # no keys: every model

    asyncio.run(main())
    assert allowed_models(Key("all")) is None
    assert allowed_models(key) is not None and allowed_models(key)("smol-2")  # type: ignore[misc]


def test_limits_answer_429_naming_the_limit_with_retry_after_and_recover() -> None:
    clock = Clock()
    metrics = ApiMetrics(table())
    access = Access(KeyStore(), LocalLimits(Limiter(clock)), metrics=metrics)
    key = Key("alice", requests_per_minute=2)
    t = table()

    async def main() -> None:
        for _ in range(2):
            rec = RequestRecord(started=0, key=key, model="smol", status=200)
            token = _current.set(rec)
            await access.enter(key, "smol", t)
            _current.reset(token)
            assert rec.admitted
            await access.finish(rec)
            clock.t += 12
        with pytest.raises(APIError) as e:
            await access.enter(key, "smol", t)
        err = e.value
        assert err.status == 429 and err.type == "requests" and err.code == "rate_limit_exceeded"
        assert "alice" in err.message and "requests per min" in err.message
        assert err.headers == {"Retry-After": "36", "retry-after-ms": "36000"}
        assert value(metrics, "llmrelay_api_key_rate_limited_total", key="alice",
                     limit="requests") == 1
        clock.t += 36
        await access.enter(key, "smol", t)

    asyncio.run(main())


def test_429s_are_counted_per_key_limit_and_day_in_the_usage_store(tmp_path: Path) -> None:
    clock = Clock()
    usage = UsageStore(tmp_path / "usage.sqlite")
    access = Access(KeyStore(), LocalLimits(Limiter(clock)), usage)
    key = Key("alice", requests_per_minute=1)

    async def main() -> None:
        await access.enter(key, "smol", table())
        for _ in range(2):
            with pytest.raises(APIError) as e:
                await access.enter(key, "smol", table())
            assert e.value.status == 429
        # committed when the 429 is raised: another connection reads it
        reader = UsageStore(tmp_path / "usage.sqlite")
        assert reader.refusals(utc_day()) == {"alice": {"requests": 2}}
        reader.close()

    asyncio.run(main())
    usage.close()
    again = UsageStore(tmp_path / "usage.sqlite")
    assert again.refusals(utc_day()) == {"alice": {"requests": 2}}
    assert again.refusals("2000-01-01") == {} and again.report() == []  # 429s are not requests
    again.close()


def test_finish_charges_the_billed_usage_to_limits_store_and_metrics(tmp_path: Path) -> None:
    clock = Clock()
    usage = UsageStore(tmp_path / "usage.sqlite")
    metrics = ApiMetrics(table())
    limiter = Limiter(clock)
    access = Access(KeyStore(), LocalLimits(limiter), usage, metrics)
    key = Key("bob", tokens_per_minute=100, concurrent=1)

    async def one(rec: RequestRecord) -> None:
        token = _current.set(rec)
        try:
            await access.enter(key, "smol", table())
            note_billed(30, 12)  # what the answer's usage says (n=2 shares one prompt)
        finally:
            _current.reset(token)
        await access.finish(rec)

    async def main() -> None:
        await one(RequestRecord(started=0, key=key, model="smol", status=200,
                                prompt_tokens=60, completion_tokens=12))
        assert limiter.state["bob"].running == 0 and limiter.state["bob"].tokens.total == 42
        # cut short (no usage shown): what the workers reported counts
        await access.finish(RequestRecord(started=0, key=key, model="smol", status=200,
                                          prompt_tokens=5, completion_tokens=2))
        # refused before anything was served: nothing recorded
        await access.finish(RequestRecord(started=0, key=key, model="", status=404))
        rows = await usage.report_async()
        assert [(r["key"], r["model"], r["requests"], r["prompt_tokens"],
                 r["completion_tokens"]) for r in rows] == [("bob", "smol", 2, 35, 14)]
        assert value(metrics, "llmrelay_api_key_prompt_tokens_total", key="bob",
                     model="smol") == 35
        assert value(metrics, "llmrelay_api_key_completion_tokens_total", key="bob",
                     model="smol") == 14
        assert value(metrics, "llmrelay_api_key_requests_total", key="bob", model="smol") == 2
        # anonymous requests (a server without keys) are counted too
        await access.finish(RequestRecord(started=0, model="smol", status=200,
                                          prompt_tokens=1, completion_tokens=1))
        assert {r["key"] for r in await usage.report_async()} == {"bob", "anonymous"}

    asyncio.run(main())
    usage.close()


def test_usage_report_is_for_admin_keys(tmp_path: Path) -> None:
    usage = UsageStore(tmp_path / "usage.sqlite")
    usage.record_now("a", "smol", 3, 4)
    usage.record_now("b", "smol", 1, 1)
    access = Access(KeyStore(["sk-x"]), usage=usage)

    async def main() -> None:
        with pytest.raises(APIError) as e:
            await access.report(Key("a"))
        assert e.value.status == 403
        with pytest.raises(APIError) as e:
            await access.report(Key("root", admin=True), since="yesterday")
        assert e.value.status == 400 and e.value.param == "since"
        got = await access.report(Key("root", admin=True), of_key="a")
        assert got["object"] == "list" and [r["key"] for r in got["data"]] == ["a"]
        assert await access.report(Key("root", admin=True), since="2999-01-01") == {
            "object": "list", "data": []}
        # a server without keys shows usage to anyone (as it serves anyone)
        assert len((await Access(KeyStore(), usage=usage).report(None))["data"]) == 2

    asyncio.run(main())
    usage.close()


def test_key_and_priority_go_only_to_workers_that_announce_fair_sharing() -> None:
    t = table(worker("http://ours", ["m"]),
              worker("http://older", ["m"], [e for e in OUR_EXTENSIONS if e != EXT_FAIRNESS]),
              worker("http://fastchat", ["m"], fastchat=True))
    transport = WorkerTransport(t, httpx.AsyncClient())
    params = {"model": "m", "prompt": "hi", "delta": True, "max_new_tokens": 3}

    async def main() -> None:
        # the caller is explicit, not read from the request's record
        body_for = transport._generation(params, Caller.of(Key("alice", priority="batch")))
        ours = await body_for(t.workers["http://ours"])
        assert ours["key"] == "alice" and ours["priority"] == "batch"
        assert "key" not in await body_for(t.workers["http://older"])
        assert "key" not in params  # the shared params are not changed
        # FastChat workers get their own params (the adapter asks them for a token count)
        no_key = transport._generation(params, None)  # a server without keys
        assert "key" not in await no_key(t.workers["http://ours"])
        await transport.aclose()

    asyncio.run(main())


def test_observe_finishes_before_the_last_body_message() -> None:
    """A client that has the whole answer also finds it counted (and its limits released)."""
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})

    async def finish(rec: RequestRecord) -> None:
        events.append(f"finish {rec.status}")

    async def send(message: dict[str, Any]) -> None:
        events.append(message["type"] + (" more" if message.get("more_body") else ""))

    middleware = ObserveMiddleware(app, ApiMetrics(table()), finish)
    scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST"}
    asyncio.run(middleware(scope, None, send))  # type: ignore[arg-type]
    assert events == ["http.response.start", "http.response.body more", "finish 200",
                      "http.response.body"]

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("no answer at all")

    events.clear()
    with pytest.raises(RuntimeError):
        asyncio.run(ObserveMiddleware(broken, ApiMetrics(table()), finish)(scope, None, send))  # type: ignore[arg-type]
    assert events == ["finish 500"]  # still finished, once
