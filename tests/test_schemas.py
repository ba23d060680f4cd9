"""Every front door's real answers validate against the providers' published schemas (vendored in
tests/schemas/, see its README): chat completions and completions against OpenAI's OpenAPI
document, /v1/responses (and /compact) against the Open Responses spec, /v1/messages against
Anthropic's types. Whole and streamed, with tools and without, errors included, read raw (httpx)
from the shared stack so that a missing or mistyped field fails here even where the SDKs are
lenient.

Known gaps of the published schemas themselves, allowed here and nowhere else: OpenAI's legacy
completion chunks carry `finish_reason: null` until the last (OpenAI's own stream does; the
schema, shared with the whole answer, says string).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from schema_check import ANTHROPIC, OPEN_RESPONSES, OPENAI, check, errors, load

from conftest import Stack

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
           "required": ["city"], "additionalProperties": False}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather",
                                              "description": "The weather in a city.",
                                              "parameters": WEATHER}}
RESP_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
             "parameters": WEATHER}
CLAUDE_TOOL = {"name": "get_weather", "description": "The weather in a city.",
               "input_schema": WEATHER}
ASK = "What is the weather in Paris?"


@pytest.fixture()
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api, timeout=120) as c:
        yield c


def sse(r: httpx.Response) -> list[tuple[str | None, Any]]:
    """(event name or None, data) of each SSE event; OpenAI's `[DONE]` as data "[DONE]"."""
    out = []
    for block in r.text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = "".join(line[6:] for line in lines if line.startswith("data: "))
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


def post(http: httpx.Client, path: str, body: dict[str, Any], status: int = 200) -> Any:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    r = http.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    return sse(r)


# ---- chat completions ---------------------------------------------------------------------------


CHAT = {"model": "smol", "messages": [{"role": "user", "content": ASK}], "max_tokens": 12,
        "temperature": 0}


def test_chat_completion_whole(http: httpx.Client) -> None:
    body = post(http, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2,
                                                "n": 2})
    check(OPENAI, "CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["refusal"] is None  # required, nullable


def test_chat_completion_with_a_tool_call(http: httpx.Client) -> None:
    body = post(http, "/v1/chat/completions", {**CHAT, "max_tokens": 40, "tools": [CHAT_TOOL],
                                                "tool_choice": "required"})
    check(OPENAI, "CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["tool_calls"]


@pytest.mark.parametrize("extra", [
    {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}},
    {"max_tokens": 40, "tools": [CHAT_TOOL], "tool_choice": "required"},
], ids=["text", "tool_call"])
def test_chat_completion_chunks(http: httpx.Client, extra: dict[str, Any]) -> None:
    events = stream(http, "/v1/chat/completions", {**CHAT, **extra})
    assert events[-1] == (None, "[DONE]")
    for _, chunk in events[:-1]:
        check(OPENAI, "CreateChatCompletionStreamResponse", chunk)


def test_chat_completion_errors(http: httpx.Client) -> None:
    check(OPENAI, "ErrorResponse", post(http, "/v1/chat/completions",
                                        {**CHAT, "temperature": 9}, 400))
    check(OPENAI, "ErrorResponse", post(http, "/v1/chat/completions",
                                        {**CHAT, "model": "nope"}, 404))


# ---- completions -------------------------------------------------------------------------------


COMPLETION = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 8,
              "temperature": 0, "logprobs": 2}


def test_completion_whole_and_chunks(http: httpx.Client) -> None:
    check(OPENAI, "CreateCompletionResponse", post(http, "/v1/completions", COMPLETION))
    events = stream(http, "/v1/completions", {**COMPLETION,
                                              "stream_options": {"include_usage": True}})
    assert events[-1] == (None, "[DONE]")
    for _, chunk in events[:-1]:
        problems = [p for p in errors(OPENAI, "CreateCompletionResponse", chunk)
                    if not p.startswith("choices/0/finish_reason: None is not ")]
        assert not problems, problems
    check(OPENAI, "ErrorResponse", post(http, "/v1/completions", {**COMPLETION, "n": 99}, 400))


# ---- responses ---------------------------------------------------------------------------------


RESPONSE = {"model": "smol", "input": ASK, "max_output_tokens": 12, "temperature": 0}


def event_schemas() -> dict[str, str]:
    """Open Responses' streaming event schemas by their `type`."""
    out = {}
    for name, schema in load(OPEN_RESPONSES)["components"]["schemas"].items():
        if name.endswith("StreamingEvent"):
            out[schema["properties"]["type"]["enum"][0]] = name
    return out


@pytest.mark.parametrize("extra", [
    {"metadata": {"k": "v"}, "safety_identifier": "u1", "prompt_cache_key": "c1"},
    {"max_output_tokens": 40, "tools": [RESP_TOOL], "tool_choice": "required"},
], ids=["text", "tool_call"])
def test_response_whole_stored_and_streamed(http: httpx.Client, extra: dict[str, Any]) -> None:
    body = post(http, "/v1/responses", {**RESPONSE, **extra})
    check(OPEN_RESPONSES, "ResponseResource", body)
    assert body["presence_penalty"] == 0 and body["frequency_penalty"] == 0
    assert body["prompt_cache_key"] == extra.get("prompt_cache_key")
    stored = http.get(f"/v1/responses/{body['id']}").json()
    check(OPEN_RESPONSES, "ResponseResource", stored)
    items = http.get(f"/v1/responses/{body['id']}/input_items").json()
    for item in items["data"]:
        check(OPEN_RESPONSES, "ItemField", item)

    by_type = event_schemas()
    events = stream(http, "/v1/responses", {**RESPONSE, **extra})
    for name, event in events:
        assert name == event["type"] and event["type"] in by_type, event
        check(OPEN_RESPONSES, by_type[event["type"]], event)
    assert events[-1][0] in ("response.completed", "response.incomplete")


def test_response_penalties_are_used_and_echoed(http: httpx.Client) -> None:
    body = post(http, "/v1/responses", {**RESPONSE, "presence_penalty": 0.5,
                                        "frequency_penalty": -0.5})
    check(OPEN_RESPONSES, "ResponseResource", body)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -0.5)


def test_response_errors(http: httpx.Client) -> None:
    check(OPENAI, "ErrorResponse", post(http, "/v1/responses", {**RESPONSE, "top_p": 5}, 400))
    check(OPENAI, "ErrorResponse", post(http, "/v1/responses", {**RESPONSE, "model": "x"}, 404))
    check(OPENAI, "ErrorResponse", http.get("/v1/responses/resp_nope").json())


# ---- responses/compact -------------------------------------------------------------------------


def test_compact_then_continue_from_the_compaction(http: httpx.Client) -> None:
    first = post(http, "/v1/responses", {**RESPONSE, "max_output_tokens": 20})
    compact = post(http, "/v1/responses/compact", {
        "model": "smol", "previous_response_id": first["id"],
        "input": [{"role": "user", "content": "And in Rome?"}]})
    check(OPEN_RESPONSES, "CompactResource", compact)
    kinds = [(i["type"], i.get("role")) for i in compact["output"]]
    assert kinds == [("message", "user"), ("message", "user"), ("compaction", None)]
    assert compact["usage"]["input_tokens"] > 0 and compact["usage"]["output_tokens"] > 0

    # the compacted output goes back in as input, the compaction item included
    later = post(http, "/v1/responses", {**RESPONSE, "store": True,
                                         "input": compact["output"] + [
                                             {"role": "user", "content": "Thanks!"}]})
    check(OPEN_RESPONSES, "ResponseResource", later)
    assert later["status"] in ("completed", "incomplete")
    items = http.get(f"/v1/responses/{later['id']}/input_items?order=asc").json()["data"]
    assert items[2]["type"] == "compaction"
    for item in items:
        check(OPEN_RESPONSES, "ItemField", item)


def test_compact_errors(http: httpx.Client) -> None:
    ask = [{"role": "user", "content": "hi"}]
    missing = post(http, "/v1/responses/compact", {"input": ask}, 400)
    check(OPENAI, "ErrorResponse", missing)
    assert missing["error"]["param"] == "model"
    unknown = post(http, "/v1/responses/compact", {"model": "nope", "input": ask}, 404)
    check(OPENAI, "ErrorResponse", unknown)
    assert unknown["error"]["code"] == "model_not_found"
    forged = post(http, "/v1/responses", {**RESPONSE, "input": [
        {"type": "compaction", "encrypted_content": "not ours"}]}, 400)
    assert forged["error"]["param"] == "input[0].encrypted_content"


# ---- messages (Anthropic) ----------------------------------------------------------------------


MESSAGE = {"model": "smol", "max_tokens": 12, "temperature": 0,
           "messages": [{"role": "user", "content": ASK}]}


@pytest.mark.parametrize("extra", [
    {"system": "Be brief."},
    {"max_tokens": 40, "tools": [CLAUDE_TOOL], "tool_choice": {"type": "any"}},
], ids=["text", "tool_use"])
def test_message_whole_and_streamed(http: httpx.Client, extra: dict[str, Any]) -> None:
    body = post(http, "/v1/messages", {**MESSAGE, **extra})
    check(ANTHROPIC, "Message", body)
    assert body["usage"]["cache_read_input_tokens"] == 0 and body["container"] is None
    events = stream(http, "/v1/messages", {**MESSAGE, **extra})
    for name, event in events:
        assert name == event["type"]
        check(ANTHROPIC, "StreamEvent", event)
    assert [n for n, _ in events][-2:] == ["message_delta", "message_stop"]


def test_message_errors_and_count(http: httpx.Client) -> None:
    check(ANTHROPIC, "ErrorResponse", post(http, "/v1/messages", {**MESSAGE, "max_tokens": 0},
                                           400))
    check(ANTHROPIC, "ErrorResponse", post(http, "/v1/messages", {**MESSAGE, "model": "x"}, 404))
    count = post(http, "/v1/messages/count_tokens", {"model": "smol",
                                                     "messages": MESSAGE["messages"]})
    check(ANTHROPIC, "MessageTokensCount", count)
