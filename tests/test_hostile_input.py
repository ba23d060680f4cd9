"""Hostile input through real processes (issue 25): every one is the client's error, a 400 in the
door's shape (OpenAI's, or Anthropic's on /v1/messages) naming the parameter, never a 5xx, never a
Retry-After, never a failover to another worker.

- a lone UTF-16 surrogate in any text, on every text route (and the worker itself refuses it as
  a bad request, not as its own failure);
- JSON nested deeper than the documented limit (128), also with models on demand declared (the
  on-demand middleware reads the body before the route);
- tool and output schemas nested too deeply for the schema validator;
- logit_bias keys that are not ASCII token ids, or out of the model's vocabulary (llama.cpp
  would wrap 4294967296 to token 0);
- a Messages tool_use block whose input is not an object; max_tokens past 64 bits, which must be
  named as the client named it, not as the worker's field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import HEARTBEAT, Procs, Stack, registered, wait_for
from llmrelay.worker.managed import free_port

SAY = "Say \\ud800 OK."  # a JSON escape of a lone surrogate, written as such in the raw body
HI = [{"role": "user", "content": "Hi"}]

# route -> (a body with the lone surrogate in one text field, the field's name)
SURROGATE_BODIES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ('{"model":"smol","max_tokens":4,"messages":[{"role":"user",'
                             f'"content":"{SAY}"}}]}}', "messages[0].content"),
    "/v1/completions": (f'{{"model":"smol","max_tokens":4,"prompt":"{SAY}"}}', "prompt"),
    "/v1/responses": (f'{{"model":"smol","max_output_tokens":4,"input":"{SAY}"}}', "input"),
    "/v1/messages": ('{"model":"smol","max_tokens":4,"messages":[{"role":"user",'
                     f'"content":"{SAY}"}}]}}', "messages[0].content"),
    "/v1/messages/count_tokens": ('{"model":"smol","messages":[{"role":"user",'
                                  f'"content":"{SAY}"}}]}}', "messages[0].content"),
    "/tokenize": (f'{{"model":"smol","prompt":"{SAY}"}}', "prompt"),
    "/v1/embeddings": (f'{{"model":"smol","input":"{SAY}"}}', "input"),
}


def post_raw(base: str, path: str, body: str | bytes) -> httpx.Response:
    data = body.encode() if isinstance(body, str) else body
    return httpx.post(base + path, content=data, headers={"content-type": "application/json"},
                      timeout=120)


def assert_bad_request(r: httpx.Response, path: str, param: str | None = None,
                       says: str = "") -> str:
    """A 400 in the door's shape, without Retry-After; returns the message."""
    assert r.status_code == 400, (path, r.status_code, r.text[:500])
    assert "retry-after" not in r.headers, (path, r.headers)
    body = r.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        message = body["error"]["message"]
    else:
        err = body["error"]
        assert err["type"] == "invalid_request_error", err
        if param is not None:
            assert err["param"] == param, (path, err)
        message = err["message"]
    if param is not None:
        assert param in message, (path, message)
    assert says in message, (path, message)
    return message


# ---- 1. lone surrogates -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SURROGATE_BODIES))
def test_a_lone_surrogate_is_a_400_naming_the_field(stack: Stack, path: str) -> None:
    body, param = SURROGATE_BODIES[path]
    r = post_raw(stack.api, path, body)
    assert_bad_request(r, path, param, "surrogate")


def test_a_lone_surrogate_as_utf8_bytes_is_refused_too(stack: Stack) -> None:
    """Python's json reads a surrogate encoded in the bytes (not escaped) as well; a surrogate
    pair is text as any other."""
    text = '{"model":"smol","max_tokens":4,"prompt":"Say \ud800 OK."}'
    r = post_raw(stack.api, "/v1/completions", text.encode("utf-8", "surrogatepass"))
    assert_bad_request(r, "/v1/completions", "prompt")
    r = post_raw(stack.api, "/v1/completions",
                 '{"model":"smol","max_tokens":2,"prompt":"Say \\ud83d\\ude00 OK."}')
    assert r.status_code == 200, r.text


def test_the_worker_refuses_a_lone_surrogate_as_a_bad_request(stack: Stack) -> None:
    """Defence in depth: the worker's answer is FastChat's 40001 (the API server passes it on
    as a 400), not an internal error (which it would take for a broken worker)."""
    worker = stack.smol_workers[0]
    r = post_raw(worker, "/worker_generate_stream",
                 f'{{"prompt":"{SAY}","max_new_tokens":4,"delta":true}}')
    frames = [json.loads(p) for p in r.content.split(b"\0") if p.strip()]
    assert frames and frames[-1]["error_code"] == 40001, frames
    assert frames[-1].get("param") == "prompt", frames
    for path in ("/count_token", "/tokenize"):
        r = post_raw(worker, path, f'{{"prompt":"{SAY}"}}')
        assert r.status_code == 400 and r.json()["error_code"] == 40001, (path, r.text)


# ---- 2. deep nesting ----------------------------------------------------------------------------


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


DEEP_BODIES = {  # each with an extra field nested `{}` levels below the body's own
    "/v1/chat/completions": '{{"model":"smol","max_tokens":2,"messages":[{{"role":"user",'
                            '"content":"Hi"}}],"extra":{}}}',
    "/v1/completions": '{{"model":"smol","max_tokens":2,"prompt":"Hi","extra":{}}}',
    "/v1/responses": '{{"model":"smol","max_output_tokens":2,"input":"Hi","extra":{}}}',
    "/v1/messages": '{{"model":"smol","max_tokens":2,"messages":[{{"role":"user",'
                    '"content":"Hi"}}],"extra":{}}}',
    "/v1/messages/count_tokens": '{{"model":"smol","messages":[{{"role":"user",'
                                 '"content":"Hi"}}],"extra":{}}}',
    "/tokenize": '{{"model":"smol","prompt":"Hi","extra":{}}}',
    "/detokenize": '{{"model":"smol","tokens":[1],"extra":{}}}',
    "/v1/embeddings": '{{"model":"smol","input":"Hi","extra":{}}}',
}


@pytest.mark.parametrize("levels", [128, 5000])
@pytest.mark.parametrize("path", sorted(DEEP_BODIES))
def test_json_nested_past_the_limit_is_a_400(stack: Stack, path: str, levels: int) -> None:
    """The body itself is one level, so 128 levels in a field are 129 in all: one too many."""
    r = post_raw(stack.api, path, DEEP_BODIES[path].format(nested(levels)))
    assert_bad_request(r, path, "body", "128 levels")
    if path == "/v1/completions" and levels == 128:  # one level less is read and served
        r = post_raw(stack.api, path, DEEP_BODIES[path].format(nested(127)))
        assert r.status_code == 200, r.text[:300]


@pytest.fixture(scope="module")
def on_demand_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API server whose table declares a model on demand (a host that never needs to load
    it here): its on-demand middleware reads every generation's body before the route."""
    base = tmp_path_factory.mktemp("hostile-od")
    catalog = base / "catalog.toml"
    catalog.write_text('[[model]]\nmodel_names = ["later"]\nmodel_path = "smollm2"\n'
                       'context_length = 512\nn_threads = 1\n')
    procs = Procs(base)
    try:
        _, controller = procs.controller()
        port = free_port()
        procs._start("host", ["host", "--port", str(port), "--controller-address", controller,
                              "--heartbeat-interval", HEARTBEAT, "--max-memory", "2GiB",
                              "--catalog", str(catalog), "--worker-log-dir",
                              str(base / "workers")])
        wait_for(lambda: registered(controller, f"http://127.0.0.1:{port}"), 60, "the host")
        _, api = procs.api(controller)
        wait_for(lambda: "later" in {m["id"] for m in httpx.get(api + "/v1/models").json()["data"]},
                 30, "the declared model in the API")
        yield api
    finally:
        procs.stop_all()


@pytest.mark.parametrize("model", ["later", "smol"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses",
                                  "/v1/messages", "/v1/embeddings"])
def test_deep_json_is_a_400_with_models_on_demand(on_demand_api: str, path: str,
                                                  model: str) -> None:
    body = DEEP_BODIES[path].format(nested(5000)).replace('"smol"', json.dumps(model))
    assert_bad_request(post_raw(on_demand_api, path, body), path, "body")
    state = next(m for m in httpx.get(on_demand_api + "/v1/models").json()["data"]
                 if m["id"] == "later")["state"]
    assert state == "unloaded"  # a refused request loads nothing


# ---- 3. deeply nested schemas -------------------------------------------------------------------


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return {"type": "object", "properties": {"x": schema}}


def test_a_deeply_nested_tool_schema_is_a_400_on_chat(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=HI, max_tokens=2, tools=[
            {"type": "function", "function": {"name": "f", "parameters": deep_schema(95)}}])
    assert e.value.body["param"] == "tools[0].function.parameters", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=HI, max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "r", "schema": deep_schema(95)}})
    assert e.value.body["param"].startswith("response_format"), e.value.body
    r = client.chat.completions.create(model="smol", messages=HI, max_tokens=8, tools=[
        {"type": "function", "function": {"name": "f", "parameters": deep_schema(60)}}])
    assert r.choices[0].finish_reason in ("tool_calls", "length", "stop")  # within the limit


def test_a_deeply_nested_tool_schema_is_a_400_on_responses(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="smol", input="Hi", max_output_tokens=16, tools=[
            {"type": "function", "name": "f", "parameters": deep_schema(95)}])
    assert e.value.body["param"] == "tools[0].parameters", e.value.body


def test_a_deeply_nested_tool_schema_is_a_400_on_messages(stack: Stack) -> None:
    claude = anthropic.Anthropic(base_url=stack.api, api_key="none", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="smol", max_tokens=2, messages=HI, tools=[
            {"name": "f", "input_schema": deep_schema(95)}])
    assert "tools[0].input_schema" in e.value.body["error"]["message"], e.value.body


# ---- 4 and 5. logit_bias ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["²", "٣", "4294967296", "9" * 5000])
def test_logit_bias_keys_that_are_not_token_ids_are_a_400(client: openai.OpenAI, key: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=HI, max_tokens=2,
                                       logit_bias={key: 5})
    assert e.value.body["param"] == "logit_bias", e.value.body


def test_logit_bias_outside_the_vocabulary_is_a_400_from_llama_cpp(client: openai.OpenAI) -> None:
    """SmolLM2's vocabulary has 49152 tokens: the worker refuses 60000 as a bad request."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=HI, max_tokens=2,
                                       logit_bias={"60000": 5})
    assert e.value.body["param"] == "logit_bias", e.value.body
    assert "60000" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="Hi", max_tokens=2, stream=True,
                                  logit_bias={"49152": -5})
    assert e.value.body["param"] == "logit_bias", e.value.body
    r = client.chat.completions.create(model="smol", messages=HI, max_tokens=2,
                                       logit_bias={"49151": 1})  # the last token: fine
    assert r.choices[0].message is not None


# ---- 11. the Messages API's tool_use input, max_tokens past 64 bits -----------------------------


def test_a_tool_use_input_that_is_not_an_object_is_a_400(stack: Stack) -> None:
    body = {"model": "smol", "max_tokens": 4, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w",
                                           "input": "Paris"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "sunny"}]}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        b = dict(body) if path == "/v1/messages" else {k: v for k, v in body.items()
                                                      if k != "max_tokens"}
        r = httpx.post(stack.api + path, json=b, timeout=120)
        assert_bad_request(r, path, "messages[1].content[0].input")


@pytest.mark.parametrize("path,field,extra", [
    ("/v1/chat/completions", "max_tokens", {"messages": HI}),
    ("/v1/chat/completions", "max_completion_tokens", {"messages": HI}),
    ("/v1/completions", "max_tokens", {"prompt": "Hi"}),
    ("/v1/responses", "max_output_tokens", {"input": "Hi"}),
    ("/v1/messages", "max_tokens", {"messages": HI}),
])
@pytest.mark.parametrize("value", [2**63, 2**64, 10**30])
def test_a_huge_token_limit_is_a_400_naming_the_clients_field(stack: Stack, path: str,
                                                              field: str, extra: dict[str, Any],
                                                              value: int) -> None:
    r = httpx.post(stack.api + path, json={"model": "smol", field: value, **extra}, timeout=120)
    message = assert_bad_request(r, path, None if path == "/v1/messages" else field)
    assert field in message and "max_new_tokens" not in message, message
