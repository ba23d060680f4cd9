"""Property-based fuzz of every route that takes a body with hypothesis: whatever the body,
never a 5xx and never a hang (an httpx timeout), and every error in the door's shape (OpenAI's,
or Anthropic's on /v1/messages).

Bodies mix valid and invalid values for every documented field, unknown fields, wrong types,
odd Unicode, raw bytes, and hostile values (issue 25): lone UTF-16 surrogates in strings,
arrays nested thousands deep, logit_bias keys of odd digits ("²"), integers past 64 bits.
Valid generation lengths are capped so the fuzz stays fast.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Stack

# Hostile leaves: a lone surrogate inside a string, nesting far past the server's limit (written
# into the body's text after json.dumps, which would itself recurse too deep), huge integers.
surrogate_text = st.builds(lambda a, c, b: a + c + b, st.text(max_size=5),
                           st.integers(0xD800, 0xDFFF).map(chr), st.text(max_size=5))
DEEP = re.compile(r'"\\u0000DEEP(\d+)\\u0000"')
deep = st.integers(100, 5000).map(lambda n: f"\x00DEEP{n}\x00")
huge = st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1])
hostile = st.one_of(surrogate_text, deep, huge)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                      st.floats(allow_nan=False, allow_infinity=False, width=32),
                      st.text(max_size=20), hostile)
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
    "max_tokens": st.one_of(st.integers(-5, 8), st.just(10**9), huge, json_leaf),
    "stop": stop,
    "stream": st.one_of(st.booleans(), json_leaf),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": json_leaf}),
                                json_leaf),
    "presence_penalty": st.one_of(st.floats(-3, 3), json_leaf),
    "frequency_penalty": st.one_of(st.floats(-3, 3), json_leaf),
    "seed": st.one_of(st.integers(-2**63, 2**63), json_leaf),
    "logit_bias": st.one_of(st.dictionaries(
        st.one_of(st.sampled_from(["²", "٣", "4294967296", "-1", "1e3", " 7", "9" * 30, "49151",
                                   "49152", "60000"]),
                  st.integers(0, 70000).map(str), st.text(max_size=4), surrogate_text),
        st.one_of(st.floats(-200, 200), json_leaf), max_size=3), json_leaf),
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


responses_input = st.one_of(
    st.text(max_size=30), surrogate_text,
    st.lists(st.fixed_dictionaries({"role": role, "content": content}), max_size=3), json_any)
responses_fields = {
    "max_output_tokens": common["max_tokens"], "temperature": common["temperature"],
    "top_p": common["top_p"], "stream": common["stream"], "tools": common["tools"],
    "tool_choice": json_leaf, "instructions": st.one_of(st.text(max_size=20), json_leaf),
    "text": st.one_of(st.none(), json_any, st.fixed_dictionaries({"format": json_any})),
    "store": json_leaf, "previous_response_id": json_leaf, "reasoning": json_any,
    "top_logprobs": common["top_logprobs"], "surprise_field": json_any,
}
valid_responses = {"model": "smol", "input": "Hi"}
responses_body = st.one_of(
    st.fixed_dictionaries({"model": model, "input": responses_input}, optional=responses_fields),
    st.sampled_from(sorted(responses_fields)).flatmap(
        lambda key: responses_fields[key].map(lambda v: {**valid_responses, key: v})))

block = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "thinking"]),
                           "text": st.one_of(st.text(max_size=10), surrogate_text, json_leaf)}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": json_leaf, "name": json_leaf,
                           "input": json_any}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": json_leaf,
                           "content": st.one_of(st.text(max_size=10), json_any)}),
    json_any)
anthropic_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                           "content": st.one_of(st.text(max_size=20), surrogate_text,
                                                st.lists(block, max_size=3), json_leaf)}),
    json_any)
messages_fields = {
    "system": st.one_of(st.text(max_size=20), st.lists(block, max_size=2), json_leaf),
    "tools": st.one_of(st.lists(st.fixed_dictionaries(
        {"name": json_leaf, "input_schema": json_any}), max_size=2), json_leaf),
    "tool_choice": st.one_of(st.fixed_dictionaries(
        {"type": st.sampled_from(["auto", "any", "tool", "none", "x"]), "name": json_leaf}),
        json_leaf),
    "stop_sequences": stop, "temperature": common["temperature"], "top_p": common["top_p"],
    "top_k": common["top_k"], "stream": common["stream"], "metadata": json_any,
    "thinking": json_any, "output_config": json_any, "surprise_field": json_any,
}
valid_messages = {"model": "smol", "max_tokens": 4, "messages": [{"role": "user",
                                                                  "content": "Hi"}]}
messages_body = st.one_of(
    st.fixed_dictionaries({"model": model, "max_tokens": common["max_tokens"],
                           "messages": st.one_of(st.lists(anthropic_message, max_size=3),
                                                 json_leaf)}, optional=messages_fields),
    st.sampled_from(sorted(messages_fields) + ["max_tokens"]).flatmap(
        lambda key: (messages_fields[key] if key in messages_fields else common["max_tokens"]).map(
            lambda v: {**valid_messages, key: v})))

token_ids = st.one_of(st.lists(st.one_of(st.integers(-5, 70000), huge, json_leaf), max_size=5),
                      json_leaf)
tokenize_body = st.fixed_dictionaries(
    {"model": model}, optional={"prompt": st.one_of(st.text(max_size=20), surrogate_text,
                                                      json_leaf),
                                "messages": st.one_of(st.lists(message, max_size=2), json_leaf),
                                "add_special_tokens": json_leaf, "tools": common["tools"],
                                "surprise_field": json_any})
detokenize_body = st.fixed_dictionaries({"model": model, "tokens": token_ids},
                                        optional={"surprise_field": json_any})
embedding_body = st.fixed_dictionaries(
    {"model": model, "input": st.one_of(st.text(max_size=20), surrogate_text,
                                        st.lists(st.text(max_size=10), max_size=3), token_ids,
                                        json_leaf)},
    optional={"dimensions": st.one_of(st.integers(-2, 1000), huge, json_leaf),
              "encoding_format": st.one_of(st.sampled_from(["float", "base64", "x"]), json_leaf),
              "user": json_leaf, "surprise_field": json_any})


# Valid bodies with one field set to a hostile value (a third of each route's examples), so the
# hostile values reach the code past validation: the tokenizer, the schema checker, the engine.
def with_one(valid: dict[str, Any], fields: dict[str, Any]) -> Any:
    return st.sampled_from(sorted(fields)).flatmap(
        lambda key: fields[key].map(lambda v: {**valid, key: v}))


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return {"type": "object", "properties": {"x": schema}}


user_says = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": surrogate_text}),
                     min_size=1, max_size=2)
odd_bias = st.dictionaries(st.sampled_from(["²", "٣", "4294967296", "9" * 30, "60000", "49152"]),
                           st.integers(-5, 5), min_size=1, max_size=2)
deep_schemas = st.integers(50, 200).map(deep_schema)
hostile_chat = with_one(valid_chat, {
    "messages": user_says, "logit_bias": odd_bias, "max_tokens": huge,
    "max_completion_tokens": huge, "surprise_field": deep, "stop": surrogate_text,
    "tools": deep_schemas.map(lambda s: [{"type": "function",
                                          "function": {"name": "f", "parameters": s}}]),
    "response_format": deep_schemas.map(lambda s: {"type": "json_schema",
                                                   "json_schema": {"name": "r", "schema": s}})})
hostile_completion = with_one(valid_completion, {
    "prompt": st.one_of(surrogate_text, st.lists(surrogate_text, min_size=1, max_size=2)),
    "logit_bias": odd_bias, "max_tokens": huge, "surprise_field": deep})
hostile_responses = with_one(valid_responses, {
    "input": surrogate_text, "instructions": surrogate_text, "max_output_tokens": huge,
    "surprise_field": deep,
    "tools": deep_schemas.map(lambda s: [{"type": "function", "name": "f", "parameters": s}])})
hostile_messages = with_one(valid_messages, {
    "messages": st.one_of(user_says, st.just([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w",
                                           "input": "Paris"}]}])),
    "system": surrogate_text, "max_tokens": huge, "metadata": deep,
    "tools": deep_schemas.map(lambda s: [{"name": "f", "input_schema": s}])})
chat_body = st.one_of(chat_body, hostile_chat)
completion_body = st.one_of(completion_body, hostile_completion)
responses_body = st.one_of(responses_body, hostile_responses)
messages_body = st.one_of(messages_body, hostile_messages)
count_tokens_body = messages_body.map(lambda b: {k: v for k, v in b.items() if k != "max_tokens"})
tokenize_body = st.one_of(tokenize_body, with_one({"model": "smol", "prompt": "Hi"}, {
    "prompt": surrogate_text, "messages": user_says, "surprise_field": deep}))
detokenize_body = st.one_of(detokenize_body, with_one({"model": "smol", "tokens": [1]}, {
    "tokens": st.lists(st.one_of(huge, st.integers(-(2**40), 2**40)), min_size=1, max_size=3),
    "surprise_field": deep}))
embedding_body = st.one_of(embedding_body, with_one({"model": "smol", "input": "Hi"}, {
    "input": st.one_of(surrogate_text, st.lists(surrogate_text, min_size=1, max_size=2)),
    "dimensions": huge, "surprise_field": deep}))


def _cap(body: Any) -> Any:
    """Keep valid generations short: the fuzz is about validation, not about generating.
    Limits past what a server takes are left as they are (refused before generating)."""
    if isinstance(body, dict):
        keys = ("max_tokens", "max_completion_tokens", "max_output_tokens")
        for key in keys:
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and 8 < v < 2**31:
                body[key] = 8
        if not any(k in body for k in keys):
            body["max_tokens"] = 4
    return body


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def encode(body: Any) -> bytes:
    """JSON with ASCII escapes (a lone surrogate as `\\udXXX`, which httpx's own encoder
    cannot write), and the deep leaves written in as nested arrays."""
    return DEEP.sub(lambda m: nested(int(m.group(1))), json.dumps(body)).encode()


STATUSES: dict[int, int] = {}


def post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST a body; a timeout is a hang, which fails the test as a 5xx does."""
    try:
        return http.post(path, content=encode(body) if not isinstance(body, bytes) else body,
                         headers={"content-type": "application/json"})
    except httpx.TimeoutException:
        pytest.fail(f"{path} hung (no answer within the client's timeout) for "
                    f"{str(body)[:300]}")


def _check(r: httpx.Response) -> None:
    STATUSES[r.status_code] = STATUSES.get(r.status_code, 0) + 1
    assert r.status_code < 500, (r.request.url.path, r.status_code, r.text[:500])
    anthropic = r.request.url.path.startswith("/v1/messages")
    if r.status_code >= 400:
        body = r.json()
        if anthropic:
            assert body["type"] == "error" and body["error"]["type"], body
        err = body["error"]
        assert isinstance(err["message"], str) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        text = r.text.rstrip()
        if anthropic:
            assert "event: message_stop" in text or "event: error" in text, text[-300:]
        elif r.request.url.path == "/v1/responses":
            assert "response.completed" in text or "response.failed" in text or \
                "response.incomplete" in text or "error" in text, text[-300:]
        else:
            assert text.endswith("data: [DONE]"), text[-300:]


@pytest.fixture(scope="module")
def http(stack: Stack) -> httpx.Client:
    with httpx.Client(base_url=stack.api, timeout=60) as c:
        yield c


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# The routes added later: fewer examples each, so the whole fuzz stays a few minutes on 2 cores.
FUZZ_MORE = settings(FUZZ, max_examples=50)


@FUZZ
@given(body=chat_body)
def test_fuzz_chat(http: httpx.Client, body: dict) -> None:
    _check(post(http, "/v1/chat/completions", _cap(body)))


@FUZZ
@given(body=completion_body)
def test_fuzz_completions(http: httpx.Client, body: dict) -> None:
    _check(post(http, "/v1/completions", _cap(body)))


@FUZZ_MORE
@given(body=responses_body)
def test_fuzz_responses(http: httpx.Client, body: dict) -> None:
    body = _cap(body)
    if "max_tokens" in body and "max_output_tokens" not in body:
        body["max_output_tokens"] = body.pop("max_tokens")
    _check(post(http, "/v1/responses", body))


@FUZZ_MORE
@given(body=messages_body)
def test_fuzz_messages(http: httpx.Client, body: dict) -> None:
    _check(post(http, "/v1/messages", _cap(body)))


@FUZZ_MORE
@given(body=count_tokens_body)
def test_fuzz_count_tokens(http: httpx.Client, body: dict) -> None:
    _check(post(http, "/v1/messages/count_tokens", body))


@FUZZ_MORE
@given(tok=tokenize_body, detok=detokenize_body)
def test_fuzz_tokenize_and_detokenize(http: httpx.Client, tok: dict, detok: dict) -> None:
    _check(post(http, "/tokenize", tok))
    _check(post(http, "/detokenize", detok))


@FUZZ_MORE
@given(body=embedding_body)
def test_fuzz_embeddings(http: httpx.Client, body: dict) -> None:
    _check(post(http, "/v1/embeddings", body))


def test_fuzz_reached_generation() -> None:
    """The fuzz is only worth something if some bodies were valid enough to generate."""
    assert STATUSES.get(200, 0) >= 5, STATUSES


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), json_any.map(encode)))
def test_fuzz_raw_bodies(http: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                 "/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize"):
        r = post(http, path, raw)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
        assert r.json()["error"]["message"], (path, r.text[:300])
