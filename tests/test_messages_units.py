"""Anthropic's Messages API and the tokenizer endpoints, their parts driven without a server:
the request's translation into chat messages and constraints (and its 400s), the worker frames
shaped into a Message and into Anthropic's events in their exact order, stop reasons, the error
shape and statuses, the SSE format, `x-api-key`; the transport's `ask` failing over; and on the
worker's side, which stop string ended a generation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import ValidationError
from starlette.requests import Request
from test_api_units import FakeTransport, batches, entry, never_gone, table_of

from llmrelay.api.access import Access
from llmrelay.api.auth import authorization
from llmrelay.api.errors import APIError, from_worker
from llmrelay.api.frames import Delta
from llmrelay.api.keys import KeyStore
from llmrelay.api.messages import errors as anthropic
from llmrelay.api.messages.protocol import CountTokensRequest, MessagesRequest
from llmrelay.api.messages.serving import MessagesServing, stop_reason, tool_use_id
from llmrelay.api.pipeline import Limits, Pipeline, Streamed, sse_stream
from llmrelay.api.transport import WorkerTransport
from llmrelay.protocol import ErrorCode, dumps
from llmrelay.worker.engines.base import Chunk, StopMatcher
from llmrelay.worker.managed import free_port
from llmrelay.worker.service import Framer

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


def request(**kw: Any) -> MessagesRequest:
    base: dict[str, Any] = {"model": "m", "max_tokens": 16,
                            "messages": [{"role": "user", "content": "Hi"}]}
    return MessagesRequest.model_validate({**base, **kw})


def bad(make: Any) -> APIError:
    with pytest.raises(APIError) as e:
        make()
    assert e.value.status == 400
    return e.value


# ---- the request ---------------------------------------------------------------------------------


def test_conversation_with_tools_becomes_chat_messages() -> None:
    body = request(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "!"}],
                   messages=[
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "timeout"}]},
            {"type": "text", "text": "And so?"}]}])
    assert body.chat_messages() == [
        {"role": "system", "content": "Be brief.\n!"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: timeout"},
        {"role": "user", "content": "And so?"},
    ]


@pytest.mark.parametrize("content, where", [
    ([{"type": "audio", "source": {"type": "base64", "data": "x"}}], "messages[0].content[0]"),
    ([{"type": "text", "text": "a"}, {"type": "document", "source": {}}],
     "messages[0].content[1]"),
    ([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}], None),
])
def test_unsupported_blocks_are_400s_naming_the_type(content: Any, where: str | None) -> None:
    e = bad(lambda: request(messages=[{"role": "user", "content": content}]).chat_messages())
    kind = [b for b in content if b["type"] != "text"][0]["type"]
    if where:
        assert f"'{kind}'" in e.message and where in e.message
    else:  # a result for a call nobody made is refused first
        assert "no earlier assistant tool_use" in e.message


def test_bad_conversations_are_400s() -> None:
    e = bad(lambda: request(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]).chat_messages())
    assert "toolu_x" in e.message
    assert "Invalid role" in bad(lambda: request(
        messages=[{"role": "bot", "content": "x"}]).chat_messages()).message
    assert "thinking" in bad(lambda: request(
        thinking={"type": "enabled", "budget_tokens": 1024}).refuse_unsupported()).message
    request(thinking={"type": "disabled"}).refuse_unsupported()
    request(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 1024}
            ).refuse_unsupported()
    assert "thinking.type" in bad(lambda: request(thinking={"type": "on"}).refuse_unsupported()
                                  ).param
    assert "mcp_servers" in bad(lambda: request(
        mcp_servers=[{"type": "url"}]).refuse_unsupported()).message
    for kw in ({"max_tokens": 0}, {"temperature": 1.5}, {"messages": []},
               {"stop_sequences": ["x"] * 17}):
        with pytest.raises(ValidationError):
            request(**kw)
    with pytest.raises(ValidationError):  # max_tokens is required
        MessagesRequest.model_validate({"model": "m", "messages": [{"role": "user",
                                                                    "content": "x"}]})
    CountTokensRequest.model_validate({"model": "m", "messages": [{"role": "user",
                                                                   "content": "x"}]})


@pytest.mark.parametrize("choice, expected", [
    (None, ("auto", False, True)),
    ({"type": "auto"}, ("auto", False, True)),
    ({"type": "any", "disable_parallel_tool_use": True}, ("required", False, False)),
    ({"type": "tool", "name": "get_weather"}, ("get_weather", True, True)),
    ({"type": "none"}, ("none", False, True)),
])
def test_tool_choice_maps_onto_chats(choice: Any, expected: tuple[str, bool, bool]) -> None:
    c = request(tools=[WEATHER], tool_choice=choice).constraints()
    assert (c.tool_choice, c.named, c.parallel) == expected
    assert c.tools[0].parameters == WEATHER["input_schema"]
    p = c.params()
    assert p["tools"][0]["function"]["name"] == "get_weather"


def test_bad_tools_are_400s_naming_the_parameter() -> None:
    cases = [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f", "input_schema": {"type": 7}}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format"),
    ]
    for kw, param in cases:
        assert bad(lambda kw=kw: request(**kw).constraints()).param == param, kw
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    c = request(output_config={"format": {"type": "json_schema", "schema": schema}}).constraints()
    assert c.response_schema == schema and c.needs() == {"json_schema": "response_format"}


# ---- the answers -------------------------------------------------------------------------------


USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


def test_stop_reasons() -> None:
    assert stop_reason(Delta.of({"finish_reason": "tool_calls"}), []) == ("tool_use", None)
    assert stop_reason(Delta.of({"finish_reason": "length"}), ["x"]) == ("max_tokens", None)
    assert stop_reason(Delta.of({"finish_reason": "stop"}), ["x"]) == ("end_turn", None)
    assert stop_reason(Delta.of({"finish_reason": "stop", "stop_sequence": "x"}), ["x"]) == \
        ("stop_sequence", "x")
    # a template's own stop string is not one the client asked for
    assert stop_reason(Delta.of({"finish_reason": "stop", "stop_sequence": "<|im_end|>"}),
                       ["x"]) == \
        ("end_turn", None)
    assert tool_use_id("call_abc") == "toolu_abc" and tool_use_id("toolu_q") == "toolu_q"
    assert tool_use_id(None).startswith("toolu_")


# What usage says besides the token counts: no prompt cache, server tools, tier, region, thinking.
NO_CACHE_USAGE = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                     "ephemeral_1h_input_tokens": 0},
                  "server_tool_use": None, "service_tier": None, "inference_geo": None,
                  "output_tokens_details": None}


def test_whole_message_shape() -> None:
    final = {"text": "Sure.", "finish_reason": "tool_calls", "usage": USAGE, "tool_calls": [
        {"index": 0, "id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"index": 1, "id": "call_2", "name": "get_weather", "arguments": '{"city": "Pa'}]}
    m = json.loads(dumps(MessagesServing.message("msg_r", "m", Delta.of(final), [])))
    assert m == {"id": "msg_r", "type": "message", "role": "assistant", "model": "m",
                 "content": [{"type": "text", "text": "Sure.", "citations": None},
                             {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                              "input": {"city": "Paris"}, "caller": {"type": "direct"}},
                             {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                              "input": {},  # cut short: not an object
                              "caller": {"type": "direct"}}],
                 "stop_reason": "tool_use", "stop_sequence": None, "stop_details": None,
                 "usage": {**NO_CACHE_USAGE, "input_tokens": 7, "output_tokens": 4},
                 "container": None}
    assert list(m) == ["id", "type", "role", "model", "content", "stop_reason",
                       "stop_sequence", "stop_details", "usage", "container"]


def events_of(frames: list[dict[str, Any]], stops: list[str] | None = None) -> list[Any]:
    async def main() -> list[Any]:
        got = MessagesServing.events("msg_r", "m", batches(*[[(0, f)] for f in frames]),
                                     stops or [])
        return [json.loads(dumps(e)) async for batch in got for e in batch]
    return asyncio.run(main())


def test_events_in_anthropics_order_text_then_tool_calls() -> None:
    u1 = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    events = events_of([
        {"text": "Hel", "usage": u1}, {"text": "lo"},
        {"text": "", "tool_calls": [{"index": 0, "id": "call_a", "name": "f", "arguments": ""}]},
        {"tool_calls": [{"index": 0, "arguments": '{"x": '}]},
        {"tool_calls": [{"index": 0, "arguments": "1}"},
                        {"index": 1, "id": "call_b", "name": "g", "arguments": "{}"}]},
        {"text": "", "finish_reason": "tool_calls", "usage": USAGE}])
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None), ("content_block_start", 0), ("ping", None),
        ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1), ("content_block_start", 2), ("content_block_delta", 2),
        ("content_block_stop", 2), ("message_delta", None), ("message_stop", None)]
    start = events[0]["message"]
    assert start["id"] == "msg_r" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {**NO_CACHE_USAGE, "input_tokens": 7, "output_tokens": 1}
    assert events[1]["content_block"] == {"type": "text", "text": "", "citations": None}
    assert events[3]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert events[6]["content_block"] == {"type": "tool_use", "id": "toolu_a", "name": "f",
                                          "input": {}, "caller": {"type": "direct"}}
    assert "".join(e["delta"]["partial_json"] for e in events[7:9]) == '{"x": 1}'
    assert events[-2] == {"type": "message_delta",
                          "delta": {"stop_reason": "tool_use", "stop_sequence": None,
                                    "stop_details": None, "container": None},
                          "usage": {"input_tokens": 7, "output_tokens": 4,
                                    "cache_creation_input_tokens": 0,
                                    "cache_read_input_tokens": 0, "server_tool_use": None,
                                    "output_tokens_details": None}}


def test_events_of_an_empty_answer_and_a_stop_sequence() -> None:
    events = events_of([{"text": "", "finish_reason": "stop", "stop_sequence": "END",
                         "usage": USAGE}], ["END"])
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta",
                                           "message_stop"]
    assert events[2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END",
                                  "stop_details": None, "container": None}


def test_serving_end_to_end_without_a_server() -> None:
    frames = [{"text": "Hel", "usage": USAGE}, {"text": "lo", "finish_reason": "stop",
                                                 "stop_sequence": "!", "usage": USAGE}]

    async def main() -> None:
        fake = FakeTransport(frames)
        table = table_of(entry("a"))
        serving = MessagesServing(table, Pipeline(fake, Limits(5, 1)),
                                  WorkerTransport(table, httpx.AsyncClient()))
        body = request(system="sys", stop_sequences=["!", ""], temperature=0.2, top_k=0)
        whole = json.loads(dumps(await serving.create(body, "rid", never_gone)))
        assert whole["content"] == [{"type": "text", "text": "Hello", "citations": None}]
        assert whole["stop_reason"] == "stop_sequence" and whole["stop_sequence"] == "!"
        p = fake.params[0]
        assert p["messages"][0] == {"role": "system", "content": "sys"}
        assert p["stop"] == ["!"] and p["temperature"] == 0.2 and p["top_k"] == -1
        assert p["max_new_tokens"] == 16 and p["delta"] and p["echo"] is False

        streamed = await serving.create(body.model_copy(update={"stream": True}), "rid",
                                        never_gone)
        assert isinstance(streamed, Streamed)
        data = b"".join([b async for b in sse_stream(streamed.chunks, streamed.opening,
                                                     streamed.fmt)])
        assert b"[DONE]" not in data
        blocks = data.decode().strip().split("\n\n")
        assert all(b.startswith("event: ") for b in blocks)
        names = [b.split("\n")[0][7:] for b in blocks]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        for b in blocks:  # each event's name is its data's type
            assert json.loads(b.split("\ndata: ")[1])["type"] == b.split("\n")[0][7:]

        fail = FakeTransport([{"text": "a", "usage": USAGE}, {"text": "oops", "error_code": 50001}])
        serving.pipeline = Pipeline(fail)
        streamed = await serving.create(body.model_copy(update={"stream": True}), "rid",
                                        never_gone)
        data = b"".join([b async for b in sse_stream(streamed.chunks, streamed.opening,
                                                     streamed.fmt)])
        last = data.decode().strip().split("\n\n")[-1]
        assert last.startswith("event: error\ndata: ")
        err = json.loads(last.split("data: ")[1])
        assert err["type"] == "error" and err["error"]["type"] == "api_error"
        assert "oops" in err["error"]["message"]

    asyncio.run(main())


# ---- errors and keys -----------------------------------------------------------------------------


def test_error_shape_and_statuses() -> None:
    def shaped(e: APIError) -> tuple[int, str]:
        r = anthropic.response(e)
        body = json.loads(r.body)
        assert body["type"] == "error" and body["error"]["message"] == e.message
        return r.status_code, body["error"]["type"]

    assert shaped(APIError(400, "x")) == (400, "invalid_request_error")
    assert shaped(APIError(401, "x")) == (401, "authentication_error")
    assert shaped(APIError(404, "x")) == (404, "not_found_error")
    assert shaped(APIError(405, "x")) == (405, "invalid_request_error")
    assert shaped(APIError(429, "limit", type="requests")) == (429, "rate_limit_error")
    assert shaped(from_worker(ErrorCode.ENGINE_OVERLOADED, "full")) == (529, "overloaded_error")
    assert shaped(APIError(503, "no worker")) == (503, "api_error")
    assert shaped(APIError(504, "slow")) == (504, "timeout_error")
    assert anthropic.response(from_worker(ErrorCode.ENGINE_OVERLOADED, "f")).headers[
        "retry-after"] == "1"


def req_with(headers: dict[str, str]) -> Request:
    return Request({"type": "http", "headers": [(k.encode(), v.encode())
                                                for k, v in headers.items()]})


def test_x_api_key_is_checked_like_a_bearer_key() -> None:
    access = Access(KeyStore(["sk-1"]))

    def check(headers: dict[str, str]) -> str:
        return access.authenticate(authorization(req_with(headers))).name

    assert check({"x-api-key": "sk-1"}) == check({"authorization": "Bearer sk-1"})
    assert authorization(req_with({"x-api-key": " sk-1 "})) == "Bearer sk-1"
    for headers in ({"x-api-key": "sk-2"}, {}, {"x-api-key": ""},
                    {"authorization": "Bearer nope", "x-api-key": "sk-1"}):
        with pytest.raises(APIError) as e:
            check(headers)
        assert e.value.status == 401


# ---- the transport's small questions -----------------------------------------------------------


def test_ask_fails_over_from_full_and_endpointless_workers() -> None:
    async def main() -> None:
        ports = [free_port() for _ in range(3)]
        seen: list[int] = []

        def handler(port: int) -> Any:
            async def count(request: web.Request) -> web.Response:
                seen.append(port)
                if port == ports[0]:
                    return web.json_response({"text": "full", "error_code": 42903})
                if port == ports[1]:
                    return web.json_response({"detail": "Not Found"}, status=404)
                return web.json_response({"count": len((await request.json())["prompt"]),
                                          "error_code": 0})
            return count

        runners = []
        for port in ports:
            app = web.Application()
            app.router.add_post("/count_token", handler(port))
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        table = table_of(*[entry(f"http://127.0.0.1:{p}", queue=i) for i, p in enumerate(ports)])
        transport = WorkerTransport(table, httpx.AsyncClient())
        try:
            async def body_for(worker: Any) -> dict[str, Any]:
                return {"prompt": [1, 2, 3]}
            data = await transport.ask("m", "/count_token", body_for)
            assert data["count"] == 3 and seen == ports and table.inflight == {}
            seen.clear()
            with pytest.raises(APIError) as e:  # only the full one accepted: busy
                await transport.ask("m", "/count_token", body_for,
                                    lambda w: w.name.endswith(str(ports[0])))
            assert e.value.status == 429 and e.value.overloaded
        finally:
            await transport.aclose()
            for r in runners:
                await r.cleanup()

    asyncio.run(main())


# ---- the worker: which stop string ended it ------------------------------------------------------


def test_stop_matcher_names_the_stop_string_and_frames_carry_it() -> None:
    m = StopMatcher(["END", "<|im_end|>"])
    assert m.feed("one EN") == ("one ", False) and m.matched is None
    assert m.feed("D two") == ("", True) and m.matched == "END"
    f = Framer(delta=True)
    f.make(Chunk("a", 3, 1))
    last = f.make(Chunk("", 3, 2, "stop", stop_sequence="END"))
    assert last["stop_sequence"] == "END" and f.whole()["stop_sequence"] == "END"
    assert "stop_sequence" not in Framer(delta=True).make(Chunk("", 3, 1, "stop"))
    merged = Chunk("a", 3, 1).merge(Chunk("b", 3, 2, "stop", stop_sequence="x"))
    assert merged.stop_sequence == "x" and merged.text == "ab"
