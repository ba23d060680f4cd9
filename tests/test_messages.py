"""Anthropic's Messages API and the tokenizer endpoints through real processes, with the official
`anthropic` SDK and httpx against the shared stack (the bundled SmolLM2 on llama.cpp): plain and
streamed answers (`messages.stream` text equals the final message), the raw event order, a forced
tool_use valid against its input_schema, a tool_result round trip, stop sequences, count_tokens
equal to a generation's input tokens, errors in Anthropic's shape; on a server of our own, API
keys as `x-api-key` or Bearer, and every worker busy as 529 overloaded_error; /tokenize and
/detokenize round trips."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from conftest import Procs, Stack

WEATHER = {"name": "get_weather", "description": "The weather now in a city.",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 40},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
ADD = {"name": "add", "description": "Add two integers.",
       "input_schema": {"type": "object", "properties": {
           "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}  # 2.15's SDK has no temperature argument: sent as an extra field


@pytest.fixture()
def claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.api, api_key="none", max_retries=0, timeout=120)


def sse(r: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of a raw Anthropic stream."""
    for block in r.read().decode().split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if lines and lines[0].startswith("event: "):
            yield lines[0][7:], json.loads(lines[1].removeprefix("data: "))


def test_plain_message(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model="smol", max_tokens=24, messages=[
        {"role": "user", "content": "Say hello."}], system="You are brief.", extra_body=GREEDY)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == "smol" and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 24


def test_streamed_text_equals_the_final_message(claude: anthropic.Anthropic,
                                                stack: Stack) -> None:
    kw: dict[str, Any] = dict(model="smol", max_tokens=30, messages=[
        {"role": "user", "content": "Tell me about the sea."}], extra_body=GREEDY)
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
    whole = claude.messages.create(**kw)
    assert whole.content[0].text == text and whole.usage == final.usage
    # The raw events, in Anthropic's order, each with its `event:` line.
    with httpx.stream("POST", stack.api + "/v1/messages", timeout=120,
                      json={**kw.pop("extra_body"), **kw, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse(r))
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["usage"]["output_tokens"] == final.usage.output_tokens


@pytest.mark.parametrize("choice, allowed", [
    ({"type": "any", "disable_parallel_tool_use": True}, {"get_weather", "add"}),
    ({"type": "tool", "name": "add", "disable_parallel_tool_use": True}, {"add"}),
])
def test_forced_tool_use_is_valid_against_its_input_schema(
        claude: anthropic.Anthropic, choice: Any, allowed: set[str]) -> None:
    m = claude.messages.create(model="smol", max_tokens=120, messages=ASK, tools=TOOLS,
                               tool_choice=choice, extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    calls = [b for b in m.content if b.type == "tool_use"]
    assert len(calls) == 1  # disable_parallel_tool_use
    call = calls[0]
    assert call.id.startswith("toolu_") and call.name in allowed
    jsonschema.validate(call.input, SCHEMAS[call.name])
    # Streamed: a call of its own (the prompt is long: llama.cpp computes it in steps whose
    # size depends on what the slot held, so greedy text can differ from the answer above; see
    # "Same numbers" in the llama.cpp engine's docstring), its input in input_json_delta pieces
    # that the SDK parses into the same input.
    with claude.messages.stream(model="smol", max_tokens=120, messages=ASK, tools=TOOLS,
                                tool_choice=choice, extra_body=GREEDY) as stream:
        pieces = [e.delta.partial_json for e in stream
                  if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and len(pieces) > 1
    streamed = [b for b in final.content if b.type == "tool_use"][0]
    assert streamed.name in allowed and json.loads("".join(pieces)) == streamed.input
    jsonschema.validate(streamed.input, SCHEMAS[streamed.name])


def test_tool_result_round_trip(claude: anthropic.Anthropic) -> None:
    first = claude.messages.create(model="smol", max_tokens=120, messages=ASK, tools=TOOLS,
                                   tool_choice={"type": "tool", "name": "get_weather",
                                                "disable_parallel_tool_use": True},
                                   extra_body=GREEDY)
    call = first.content[-1]
    assert call.type == "tool_use"
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                        for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": json.dumps({"temperature": 21})}]}]
    m = claude.messages.create(model="smol", max_tokens=40, messages=history, tools=TOOLS,
                               tool_choice={"type": "none"}, extra_body=GREEDY)
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.content and all(b.type == "text" for b in m.content) and m.content[0].text
    # A result for a call nobody made is refused.
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="smol", max_tokens=8, messages=[
            *ASK, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                                "content": "1"}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"


def test_stop_sequence_is_named(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model="smol", max_tokens=60, stop_sequences=["5"], messages=[
        {"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "5"
    assert "5" not in m.content[0].text


def test_count_tokens_equals_a_generations_input(claude: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = dict(model="smol", messages=ASK, system="You are a weather bot.")
    plain = claude.messages.count_tokens(**kw).input_tokens
    assert plain == claude.messages.create(max_tokens=1, **kw).usage.input_tokens
    with_tools = claude.messages.count_tokens(tools=TOOLS, **kw).input_tokens
    assert with_tools > plain + 20  # the tools are in the prompt
    assert with_tools == claude.messages.create(max_tokens=1, tools=TOOLS,
                                                **kw).usage.input_tokens


def test_errors_are_in_anthropics_shape(claude: anthropic.Anthropic, stack: Stack) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        claude.messages.create(model="smoll", max_tokens=8, messages=ASK)
    assert nf.value.body["type"] == "error"
    assert nf.value.body["error"]["type"] == "not_found_error"
    assert "Did you mean 'smol'" in nf.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as img:
        claude.messages.create(model="smol", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}}]}])
    assert img.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source.data: the data is not an image" in img.value.body[
        "error"]["message"]
    for body, word in [({"model": "smol", "messages": ASK}, "max_tokens"),
                       ({"model": "smol", "max_tokens": 8, "messages": ASK, "temperature": 3},
                        "temperature"),
                       ({"model": "smol", "max_tokens": 8, "messages": ASK,
                         "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking")]:
        r = httpx.post(stack.api + "/v1/messages", json=body, timeout=30)
        assert r.status_code == 400, body
        assert r.json()["type"] == "error" and word in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(stack.api + "/v1/messages", content=b"{nope", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(stack.api + "/v1/chat/completions", json={"model": "smoll", "messages": ASK})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_keys_as_x_api_key_or_bearer_and_busy_workers_are_529(procs: Procs) -> None:
    """A server of our own: API keys, and one worker taking one request at a time with no
    queue."""
    _, controller = procs.controller()
    procs.worker(controller, "smol", extra=("--limit-worker-concurrency", "1",
                                            "--max-queue", "0"))
    _, api = procs.api(controller, extra=("--api-keys", "sk-anthropic"))
    body = {"model": "smol", "max_tokens": 4, "messages": ASK}
    r = httpx.post(api + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 401 and r.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": r.json()["error"]["message"]},
        "request_id": None}
    assert "x-api-key" in r.json()["error"]["message"]
    r = httpx.post(api + "/v1/messages", json=body, headers={"x-api-key": "sk-wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(api + "/v1/messages", json=body, timeout=60,
                   headers={"x-api-key": "sk-anthropic", "anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = httpx.post(api + "/v1/messages/count_tokens", json={"model": "smol", "messages": ASK},
                   headers={"x-api-key": "sk-anthropic"})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=api, api_key="sk-wrong", max_retries=0).messages.create(
            **body)
    claude = anthropic.Anthropic(base_url=api, api_key="sk-anthropic", max_retries=0,
                                 timeout=120)
    assert claude.messages.create(**body).content  # 2.15 sends the key as a Bearer token
    # The worker's one slot taken by a long answer: the next request is 529 overloaded_error.
    started, release = threading.Event(), threading.Event()

    def long_answer() -> None:
        with claude.messages.stream(model="smol", max_tokens=1000, messages=[
                {"role": "user", "content": "Write a very long story."}]) as stream:
            for _ in stream.text_stream:
                started.set()
                if release.is_set():
                    break

    t = threading.Thread(target=long_answer)
    t.start()
    try:
        assert started.wait(60)
        with pytest.raises(anthropic.OverloadedError) as e:
            claude.messages.create(**body)
        assert e.value.status_code == 529
        assert e.value.body["error"]["type"] == "overloaded_error"
        assert e.value.response.headers["retry-after"] == "1"
        # OpenAI's routes say the same as their 429.
        r = httpx.post(api + "/v1/chat/completions", json={"model": "smol", "messages": ASK},
                       headers={"Authorization": "Bearer sk-anthropic"}, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        release.set()
        t.join(120)


def test_tokenize_and_detokenize_round_trip(stack: Stack, client: Any) -> None:
    text = "Hello world, how are you?"
    for model in ("smol", "gemma"):
        r = httpx.post(stack.api + "/tokenize", json={"model": model, "prompt": text}).json()
        assert r["count"] == len(r["tokens"]) > 3 and r["max_model_len"] == 2048
        back = httpx.post(stack.api + "/detokenize",
                          json={"model": model, "tokens": r["tokens"]}).json()
        assert back["prompt"].endswith(text) and back["content"] == back["prompt"]  # (a BOS)
        same = httpx.post(stack.api + "/tokenize", json={"model": model, "content": text}).json()
        assert same["tokens"] == r["tokens"]  # llama.cpp's name for the prompt
    # Chat messages: the tokens a generation of them reads.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = httpx.post(stack.api + "/tokenize", json={"model": "smol", "messages": messages}).json()
    used = client.chat.completions.create(model="smol", messages=messages, max_tokens=1)
    assert r["count"] == used.usage.prompt_tokens
    text_of = httpx.post(stack.api + "/detokenize",
                         json={"model": "smol", "tokens": r["tokens"]}).json()["prompt"]
    assert "Be brief." in text_of and "<|im_start|>assistant" in text_of
    # Errors in OpenAI's shape (vLLM's).
    r = httpx.post(stack.api + "/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(stack.api + "/detokenize", json={"model": "smol", "tokens": [10 ** 9]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = httpx.post(stack.api + "/tokenize", json={"model": "smol"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
