"""Keys are isolated, through real API servers with a keys file in front of the session's
workers: a key fenced to one model learns nothing of other keys or other models from any route
that lists or counts (the models, the metrics, the worker table, the usage, /health, errors);
the operator's routes need an admin key (`/metrics` also a metrics-only key, which may do
nothing else); anonymous `/health` says only that the server is up; the API docs follow the
keys unless `--public-docs`; with no keys everything stays open."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import Procs, Stack, wait_for
from llmrelay.api.keys import add_key

Q = [{"role": "user", "content": "Hi"}]
DOCS = ("/docs", "/redoc", "/openapi.json")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed(procs: Procs, stack: Stack, tmp_path: Path, *extra: str) -> tuple[str, dict[str, str]]:
    """An API server with a keys file: ops (admin), alice (smol only), bob (gemma only), prom
    (metrics only). Returns its URL and the keys' secrets by those names."""
    path = tmp_path / "keys.toml"
    keys = {"ops": add_key(path, "ops_k7", admin=True),  # names found in no other text
            "alice": add_key(path, "alice_k7", models=["smol"]),
            "bob": add_key(path, "bob_k7", models=["gemma"]),
            "prom": add_key(path, "prom_k7", metrics_only=True)}
    _, api = procs.api(stack.controller, extra=("--api-keys-file", str(path), "--data-dir",
                                                str(tmp_path / "data"), *extra))
    wait_for(lambda: {"smol", "gemma"} <= set(httpx.get(
        api + "/health", headers=bearer(keys["ops"])).json()["models"]), 30, "the models")
    return api, keys


def test_a_fenced_key_sees_nothing_of_other_keys_or_models(stack: Stack, procs: Procs,
                                                           tmp_path: Path) -> None:
    api, keys = keyed(procs, stack, tmp_path)
    alice, bob, ops = bearer(keys["alice"]), bearer(keys["bob"]), bearer(keys["ops"])
    for who, model in ((alice, "smol"), (bob, "gemma")):  # usage and metrics for both
        r = httpx.post(api + "/v1/chat/completions", headers=who, timeout=120,
                       json={"model": model, "messages": Q, "max_tokens": 2})
        assert r.status_code == 200, r.text
    secrets_of_others = [stack.gemma_worker, *stack.smol_workers, "bob_k7", "ops_k7", "prom_k7"]

    def hidden(r: httpx.Response, also: tuple[str, ...] = ("gemma",)) -> None:
        for word in (*secrets_of_others, *also):
            assert word not in r.text, (r.request.url, word, r.text[:300])

    # what alice may list: only her model
    r = httpx.get(api + "/v1/models", headers=alice)
    assert [m["id"] for m in r.json()["data"]] == ["smol"]
    hidden(r)
    assert httpx.get(api + "/v1/models/smol", headers=alice).status_code == 200
    # another model is as if it did not exist, and the refusal lists only hers
    for method, path, body in (
            ("GET", "/v1/models/gemma", None),
            ("POST", "/v1/chat/completions", {"model": "gemma", "messages": Q, "max_tokens": 1}),
            ("POST", "/v1/completions", {"model": "gemma", "prompt": "x", "max_tokens": 1}),
            ("POST", "/v1/messages/count_tokens", {"model": "gemma", "messages": Q}),
            ("POST", "/tokenize", {"model": "gemma", "prompt": "x"})):
        r = httpx.request(method, api + path, headers=alice, json=body, timeout=60)
        assert r.status_code == 404, (path, r.text)
        hidden(r, also=())  # names only what she asked for
        assert "smol" in r.text or path == "/v1/models/gemma", r.text
    # the operator's routes: refused, in OpenAI's shape, saying why
    for path in ("/metrics", "/api/workers", "/v1/usage"):
        r = httpx.get(api + path, headers=alice)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "insufficient_permissions"
        hidden(r)
    # /health: up, nothing more, to her and to anyone
    for who in (alice, bob, {}, bearer("sk-wrong")):
        r = httpx.get(api + "/health", headers=who)
        assert r.status_code == 200 and r.json() == {"status": "ok"}

    # the admin key reads all of it
    health = httpx.get(api + "/health", headers=ops).json()
    assert {"smol", "gemma"} <= set(health["models"]) and health["workers"] >= 3
    metrics = httpx.get(api + "/metrics", headers=ops)
    assert metrics.status_code == 200 and 'key="bob_k7"' in metrics.text
    table = httpx.get(api + "/api/workers", headers=ops).json()
    assert {w["address"] for w in table["workers"]} == {*stack.smol_workers, stack.gemma_worker}
    usage = httpx.get(api + "/v1/usage", headers=ops).json()["data"]
    assert {(u["key"], u["model"]) for u in usage} == {("alice_k7", "smol"), ("bob_k7", "gemma")}

    # a metrics-only key scrapes the metrics and may do nothing else
    prom = bearer(keys["prom"])
    assert 'key="alice_k7"' in httpx.get(api + "/metrics", headers=prom).text
    for method, path, body in (
            ("GET", "/api/workers", None), ("GET", "/v1/models", None), ("GET", "/v1/usage", None),
            ("POST", "/v1/chat/completions", {"model": "smol", "messages": Q, "max_tokens": 1})):
        r = httpx.request(method, api + path, headers=prom, json=body, timeout=60)
        assert r.status_code == 403, (path, r.text)
        hidden(r, also=("gemma", "alice_k7", "smol"))
    assert httpx.get(api + "/health", headers=prom).json() == {"status": "ok"}
    # no key, or a wrong one, on the operator's routes: 401
    for path in ("/metrics", "/api/workers"):
        assert httpx.get(api + path).status_code == 401
        assert httpx.get(api + path, headers=bearer("sk-wrong")).status_code == 401


@pytest.mark.parametrize("public", [False, True])
def test_api_docs_follow_the_keys_unless_public(stack: Stack, procs: Procs, tmp_path: Path,
                                               public: bool) -> None:
    api, keys = keyed(procs, stack, tmp_path, *(("--public-docs",) if public else ()))
    for path in DOCS:
        r = httpx.get(api + path)
        assert r.status_code == (200 if public else 401), (path, r.text[:200])
        assert httpx.get(api + path, headers=bearer("sk-wrong")).status_code == (
            200 if public else 401)
        assert httpx.get(api + path, headers=bearer(keys["alice"])).status_code == 200
    spec = httpx.get(api + "/openapi.json", headers=bearer(keys["alice"])).json()
    assert "/v1/chat/completions" in spec["paths"]
    assert "openapi.json" in httpx.get(api + "/docs", headers=bearer(keys["alice"])).text


def test_without_keys_everything_stays_open(stack: Stack) -> None:
    health = httpx.get(stack.api + "/health").json()
    assert {"smol", "gemma"} <= set(health["models"]) and health["controller_reachable"]
    assert httpx.get(stack.api + "/metrics").status_code == 200
    table = httpx.get(stack.api + "/api/workers").json()
    assert {w["address"] for w in table["workers"]} >= {*stack.smol_workers, stack.gemma_worker}
    for path in DOCS:
        assert httpx.get(stack.api + path).status_code == 200
