"""Property-based fuzz of the OpenAI surface with hypothesis: whatever the body, never a 5xx.

Bodies mix valid and invalid values for every documented field, unknown fields, wrong types,
odd Unicode, and raw bytes. Valid generation lengths are capped so the fuzz stays fast.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Stack

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                      st.floats(allow_nan=False, allow_infinity=False, width=32),
                      st.text(max_size=20))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)

role = st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool",
                                  "function", "wizard", ""]), json_leaf)
content = st.one_of(st.text(max_size=40), st.none(), st.integers(),
                    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url",
                                                                             "audio"]),
                                                    "text": st.one_of(st.text(max_size=10),
                                                                      st.none())}), max_size=2))
message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}), json_any)
stop = st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20),
                 json_leaf)
model = st.one_of(st.sampled_from(["smol", "smol", "smol", "gemma", "Smol", ""]), json_leaf)
common = {
    "temperature": st.one_of(st.floats(-1, 3), json_leaf),
    "top_p": st.one_of(st.floats(-0.5, 1.5), json_leaf),
    "top_k": st.one_of(st.integers(-3, 50), json_leaf),
    "n": st.one_of(st.integers(-1, 3), st.just(1000), json_leaf),
    "max_tokens": st.one_of(st.integers(-5, 8), st.just(10**9), json_leaf),
    "stop": stop,
    "stream": st.one_of(st.booleans(), json_leaf),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": json_leaf}),
                                json_leaf),
    "presence_penalty": st.one_of(st.floats(-3, 3), json_leaf),
    "frequency_penalty": st.one_of(st.floats(-3, 3), json_leaf),
    "seed": st.one_of(st.integers(-2**63, 2**63), json_leaf),
    "logprobs": json_leaf,
    "top_logprobs": st.one_of(st.integers(-1, 25), json_leaf),
    "user": json_leaf,
    "tools": st.one_of(st.none(), json_any),
    "response_format": st.one_of(st.none(), json_any),
    "surprise_field": json_any,
}
chat_body = st.fixed_dictionaries({"model": model,
                                   "messages": st.one_of(st.lists(message, max_size=3),
                                                         json_leaf)},
                                  optional={**common, "max_completion_tokens": common["max_tokens"]})
# Near-valid bodies: a valid request with one field fuzzed, to get past validation often.
valid_chat = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}]}
near_valid_chat = st.sampled_from(sorted(common)).flatmap(
    lambda key: common[key].map(lambda v: {**valid_chat, key: v}))
chat_body = st.one_of(chat_body, near_valid_chat)
valid_completion = {"model": "smol", "prompt": "Hello"}
near_valid_completion = st.sampled_from(sorted(common) + ["echo", "suffix", "best_of"]).flatmap(
    lambda key: (common[key] if key in common else json_leaf).map(
        lambda v: {**valid_completion, key: v}))
completion_body = st.fixed_dictionaries(
    {"model": model,
     "prompt": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3),
                         st.lists(st.integers(-5, 60000), max_size=5),
                         st.lists(st.lists(st.integers(0, 50000), max_size=3), max_size=2),
                         json_leaf)},
    optional={**common, "echo": json_leaf, "suffix": json_leaf, "best_of": json_leaf})
completion_body = st.one_of(completion_body, near_valid_completion)


def _cap(body: Any) -> Any:
    """Keep valid generations short: the fuzz is about validation, not about generating."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 8:
                body[key] = 8
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 4
    return body


STATUSES: dict[int, int] = {}


def _check(r: httpx.Response) -> None:
    STATUSES[r.status_code] = STATUSES.get(r.status_code, 0) + 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")


@pytest.fixture(scope="module")
def http(stack: Stack) -> httpx.Client:
    with httpx.Client(base_url=stack.api, timeout=60) as c:
        yield c


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(body=chat_body)
def test_fuzz_chat(http: httpx.Client, body: dict) -> None:
    _check(http.post("/v1/chat/completions", json=_cap(body)))


@FUZZ
@given(body=completion_body)
def test_fuzz_completions(http: httpx.Client, body: dict) -> None:
    _check(http.post("/v1/completions", json=_cap(body)))


def test_fuzz_reached_generation() -> None:
    """The fuzz is only worth something if some bodies were valid enough to generate."""
    assert STATUSES.get(200, 0) >= 5, STATUSES


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), json_any.map(lambda v: json.dumps(v).encode())))
def test_fuzz_raw_bodies(http: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
