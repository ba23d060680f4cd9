"""The Responses API's parts without a server: request checks (400s naming the parameter), input
items to chat messages, whole answers to output items, the streamed event sequence checked by
the `openai` SDK's own types and stream state, the SQLite store (owners, age, size, restart),
and the serving class end to end over a fake transport."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter
from test_api_units import FakeTransport, entry, never_gone, table_of

from llmrelay.api.errors import APIError
from llmrelay.api.frames import Delta
from llmrelay.api.pipeline import Limits, Pipeline, Streamed
from llmrelay.api.responses.events import EventWriter, encode
from llmrelay.api.responses.items import input_items, output_items, to_messages
from llmrelay.api.responses.protocol import Response, ResponsesRequest
from llmrelay.api.responses.serving import ResponsesServing, owner_of
from llmrelay.api.responses.store import SqliteResponseStore, StoredResponse
from llmrelay.protocol import dumps

EVENT = TypeAdapter(ResponseStreamEvent)
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
WEATHER = {"type": "function", "name": "get_weather", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}


def plain(obj: Any) -> Any:
    return json.loads(dumps(obj))


def req(**kw: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **kw})


def head(**kw: Any) -> Response:
    fields: dict[str, Any] = dict(
        id="resp_1", created_at=7, instructions=None, max_output_tokens=None, model="m",
        parallel_tool_calls=True, previous_response_id=None, store=True, temperature=0.7,
        text={"format": {"type": "text"}}, tool_choice="auto", tools=[], top_p=1.0, user=None,
        metadata={})
    return Response(**{**fields, **kw})


def bad(fn: Any, param: str) -> str:
    with pytest.raises(APIError) as e:
        fn()
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)
    return e.value.message


# ---- the request ----------------------------------------------------------------------------------


def test_request_refuses_what_it_cannot_honour_naming_the_parameter() -> None:
    req(include=[], service_tier="auto", truncation="disabled", reasoning={}, background=False,
        store=False, metadata={"a": "b"}).refuse_unsupported()
    assert "web_search" in bad(lambda: req(tools=[{"type": "web_search"}]).constraints(),
                               "tools[0].type")
    assert "flat" in bad(lambda: req(tools=[{"type": "function", "function": {
        "name": "f"}}]).constraints(), "tools[0].name")
    bad(lambda: req(background=True).refuse_unsupported(), "background")
    bad(lambda: req(truncation="auto").refuse_unsupported(), "truncation")
    bad(lambda: req(include=["message.output_text.logprobs"]).refuse_unsupported(),
        "include[0]")
    req(reasoning={"effort": "high", "summary": "auto"}).refuse_unsupported()
    bad(lambda: req(reasoning={"effort": "extreme"}).refuse_unsupported(), "reasoning.effort")
    bad(lambda: req(reasoning={"max_tokens": -1}).refuse_unsupported(), "reasoning.max_tokens")
    assert "Unknown parameter" in bad(lambda: req(frobnicate=1).refuse_unsupported(),
                                      "frobnicate")
    bad(lambda: req(metadata={str(i): "v" for i in range(17)}).refuse_unsupported(), "metadata")
    bad(lambda: req(tools=[WEATHER], tool_choice={"type": "allowed_tools"}).constraints(),
        "tool_choice")
    bad(lambda: req(tool_choice="required").constraints(), "tool_choice")
    bad(lambda: req(text={"format": {"type": "json_schema", "name": "x"}}).constraints(),
        "text.format.schema")
    bad(lambda: req(text={"format": {"type": "grammar"}}).constraints(), "text.format.type")


def test_request_constraints_and_echoes() -> None:
    r = req(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            text={"format": {"type": "json_schema", "name": "p", "strict": True,
                             "schema": {"type": "object"}}})
    c = r.constraints()
    assert (c.tool_choice, c.named, c.parallel) == ("get_weather", True, False)
    assert c.response_schema == {"type": "object"} and c.response_name == "p"
    assert c.params()["tools"][0]["function"]["name"] == "get_weather"
    assert r.echo_tool_choice() == {"type": "function", "name": "get_weather"}
    assert r.echo_text() == {"format": {"type": "json_schema", "name": "p", "strict": True,
                                        "schema": {"type": "object"}}}
    assert r.echo_tools(c.tools)[0]["name"] == "get_weather"
    assert req().constraints().tool_choice == "none" and req().echo_tool_choice() == "auto"
    assert req(text={"format": {"type": "json_object"}}).constraints().response_json_object


# ---- items ----------------------------------------------------------------------------------------


AGENT_TURN = [  # what the OpenAI Agents SDK sends on its second turn (no "type" on messages)
    {"role": "user", "content": "Weather in Paris?"},
    {"arguments": '{"city": "Paris"}', "call_id": "call_1", "name": "get_weather",
     "type": "function_call", "id": "fc_1", "status": "completed"},
    {"call_id": "call_1", "output": "sunny in Paris", "type": "function_call_output"},
]


def test_items_become_chat_messages_with_calls_and_their_outputs() -> None:
    items = input_items([{"type": "message", "role": "developer",
                          "content": [{"type": "input_text", "text": "Be brief."}]},
                         {"role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
                         *AGENT_TURN])
    assert [i["type"] for i in items] == ["message", "message", "message", "function_call",
                                          "function_call_output"]
    assert all(i["id"] for i in items) and items[3]["id"] == "fc_1"
    assert items[1]["content"][0] == {"type": "output_text", "text": "Hi", "annotations": [],
                                      "logprobs": []}
    assert to_messages("sys", items) == [
        {"role": "system", "content": "sys"},
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny in Paris"}]
    # an assistant's text and its calls are one message
    both = to_messages(None, input_items([{"role": "assistant", "content": "Let me see."},
                                          AGENT_TURN[1]]))
    assert both == [{"role": "assistant", "content": "Let me see.",
                     "tool_calls": [{"id": "call_1", "type": "function", "function": {
                         "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]
    assert input_items("hello")[0]["content"] == [{"type": "input_text", "text": "hello"}]


def test_unsupported_items_and_parts_are_400s_naming_the_type() -> None:
    assert "file_id" in bad(lambda: input_items([{"role": "user", "content": [
        {"type": "input_image", "file_id": "file_1"}]}]), "input[0].content[0].file_id")
    assert "web_search_call" in bad(lambda: input_items([{"type": "web_search_call"}]),
                                    "input[0].type")
    assert "previous_response_id" in bad(lambda: input_items(
        [{"type": "item_reference", "id": "x"}]), "input[0].type")
    bad(lambda: input_items([{"content": "x"}]), "input[0].type")
    bad(lambda: input_items([{"role": "tool", "content": "x"}]), "input[0].role")
    bad(lambda: input_items([{"type": "function_call", "name": "f", "arguments": "{}"}]),
        "input[0].call_id")
    # an output that answers no call, named by its place in the request's own input
    history = input_items(AGENT_TURN[:2])
    orphan = input_items([{"type": "function_call_output", "call_id": "nope", "output": "x"}])
    bad(lambda: to_messages(None, history + orphan, first_new=2), "input[0].call_id")


def test_whole_answers_become_output_items() -> None:
    items = plain(output_items(Delta.of({"text": "Hi", "tool_calls": [
        {"id": "call_a", "name": "f", "arguments": "{}"}]})))
    assert [i["type"] for i in items] == ["message", "function_call"]
    assert items[0]["content"] == [{"type": "output_text", "text": "Hi", "annotations": [],
                                    "logprobs": []}]
    assert items[1]["call_id"] == "call_a" and items[1]["id"].startswith("fc_")
    only_call = plain(output_items(Delta.of({"text": "", "tool_calls": [{"id": "c", "name": "f",
                                                                 "arguments": "{"}]}), True))
    assert [i["type"] for i in only_call] == ["function_call"]
    assert only_call[0]["status"] == "incomplete"
    assert plain(output_items(Delta.of({"text": ""})))[0]["content"][0]["text"] == ""


# ---- the event sequence ---------------------------------------------------------------------------


def feed(w: EventWriter, frames: list[tuple[int, dict[str, Any]]]) -> list[Any]:
    """Worker frames (JSON objects), parsed as the transport does, fed to the writer."""
    return list(w.feed([(i, Delta.of(f)) for i, f in frames]))


def replay(events: list[Any]) -> tuple[list[str], ResponseStreamState[Any]]:
    """The events through the SDK's types (strict) and stream state (which raises on a wrong
    order); their types."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[WEATHER],  # type: ignore[list-item]
                                                          text_format=omit)
    types, seq = [], -1
    for e in events:
        parsed = EVENT.validate_python(plain(e))
        assert parsed.sequence_number == seq + 1
        seq = parsed.sequence_number
        state.handle_event(parsed)
        types.append(parsed.type)
    return types, state


def test_text_then_calls_stream_in_the_sdk_order() -> None:
    w = EventWriter(head(), now=lambda: 9.0)
    events = w.start()
    events += feed(w, [(0, {"text": "Let"}), (0, {"text": " me"})])
    events += feed(w, [(0, {"tool_calls": [{"index": 0, "id": "call_a", "name": "get_weather"}]}),
                      (0, {"tool_calls": [{"index": 0, "arguments": '{"city":'}]})])
    events += feed(w, [(0, {"tool_calls": [{"index": 0, "arguments": ' "Paris"}'},
                                          {"index": 1, "id": "call_b", "name": "get_weather",
                                           "arguments": "{}"}]})])
    events += feed(w, [(0, {"finish_reason": "tool_calls", "usage": USAGE})])
    events += w.finish()
    types, state = replay(events)
    assert types == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    final = state._completed_response
    assert final is not None and final.status == "completed" and final.output_text == "Let me"
    calls = [i for i in final.output if i.type == "function_call"]
    assert [(c.call_id, c.arguments) for c in calls] == [("call_a", '{"city": "Paris"}'),
                                                         ("call_b", "{}")]
    assert calls[0].parsed_arguments == {"city": "Paris"}  # strict tool: parsed by the SDK
    assert final.usage is not None and final.usage.total_tokens == 7
    assert final.completed_at == 9
    SDKResponse.model_validate(plain(w.final))  # every required field, strictly
    # the created event still shows the response as it began
    assert plain(events[0])["response"]["output"] == [] and \
        plain(events[0])["response"]["status"] == "in_progress"
    assert encode(events[0]).startswith(b"event: response.created\ndata: {")


def test_length_limit_is_incomplete_and_errors_fail() -> None:
    w = EventWriter(head(max_output_tokens=2))
    events = w.start() + feed(w, [(0, {"text": "Hi"}), (0, {"text": "!", "finish_reason": "length",
                                                            "usage": USAGE})]) + w.finish()
    types, _ = replay(events)
    assert types[-1] == "response.incomplete"
    final = plain(w.final)
    assert final["status"] == "incomplete" and final["completed_at"] is None
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    SDKResponse.model_validate(final)

    w = EventWriter(head())
    events = w.start() + feed(w, [(0, {"text": "Hi"})]) + w.fail(APIError(500, "worker died",
                                                                        "server_error"))
    types, _ = replay(events)
    assert types[-2:] == ["response.output_item.done", "response.failed"]
    final = plain(w.final)
    assert final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": "worker died"}
    SDKResponse.model_validate(final)

    # nothing said, nothing called: an empty message, as a whole answer has
    w = EventWriter(head())
    types, state = replay(w.start() + feed(w, [(0, {"finish_reason": "stop", "usage": USAGE})])
                          + w.finish())
    assert "response.output_item.added" in types and state._completed_response is not None
    assert state._completed_response.output_text == ""


# ---- the store ----------------------------------------------------------------------------------


def record(rid: str, owner: str = "a", at: float = 100.0, size: int = 10) -> StoredResponse:
    return StoredResponse(rid, owner, at, {"id": rid, "pad": "x" * size}, [{"id": "msg_1"}])


def test_store_owners_age_size_and_restart(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "responses.sqlite"
    s = SqliteResponseStore(path, max_bytes=10_000, max_age=100.0, clock=lambda: now[0])
    s.put_now(record("r1", "a", 950.0))
    assert s.get_now("a", "r1") is not None and s.get_now("b", "r1") is None
    assert not s.delete_now("b", "r1") and s.get_now("a", "r1") is not None
    now[0] = 1060.0  # r1 is now past the age limit
    assert s.get_now("a", "r1") is None
    s.put_now(record("r2", "a", 1060.0))  # a put drops what is too old
    assert s.count() == 1
    s.close()
    again = SqliteResponseStore(path, max_bytes=10_000, max_age=100.0, clock=lambda: now[0])
    got = again.get_now("a", "r2")  # survives a restart
    assert got is not None and got.input_items == [{"id": "msg_1"}]
    assert again.total > 0
    assert again.delete_now("a", "r2") and again.get_now("a", "r2") is None
    assert again.total == 0
    again.close()

    small = SqliteResponseStore(":memory:", max_bytes=3000, clock=lambda: now[0])
    for i in range(10):
        small.put_now(record(f"s{i}", at=1000.0 + i, size=900))
    kept = [i for i in range(10) if small.get_now("a", f"s{i}") is not None]
    assert kept == [7, 8, 9] and small.total <= 3000  # the oldest evicted first
    small.close()


def test_owner_is_a_hash_of_the_key() -> None:
    from starlette.requests import Request

    from llmrelay.api.auth import authorization

    def header(**headers: str) -> str:  # as the route reads it (x-api-key as a Bearer key)
        return authorization(Request({"type": "http", "headers": [
            (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}))

    assert owner_of(header(authorization="Bearer sk-1"), keyed=False) == ""
    a = owner_of(header(authorization="Bearer sk-1"), keyed=True)
    assert a.startswith("sha256:") and "sk-1" not in a
    assert owner_of(header(x_api_key="sk-1"), keyed=True) == a != owner_of(
        header(authorization="Bearer sk-2"), keyed=True)
    with pytest.raises(APIError) as e:
        owner_of(header(), keyed=True)
    assert e.value.status == 401


# ---- the serving class, end to end over a fake transport ----------------------------------------


def test_serving_whole_streamed_stored_and_continued() -> None:
    async def main() -> None:
        fake = FakeTransport([{"text": "Hel"}, {"text": "lo", "finish_reason": "stop",
                                                 "usage": USAGE}])
        store = SqliteResponseStore(":memory:", clock=lambda: 42.0)
        serving = ResponsesServing(table_of(entry("m")), Pipeline(fake, Limits(5, 1)), store,
                                   clock=lambda: 42.0)
        whole = await serving.create(req(instructions="Be brief.", max_output_tokens=9), "rid",
                                     "a", never_gone)
        assert isinstance(whole, Response)
        r = plain(whole)
        SDKResponse.model_validate(r)
        assert r["status"] == "completed" and r["id"].startswith("resp_")
        assert r["output"][0]["content"][0]["text"] == "Hello"
        assert r["usage"]["input_tokens"] == 5 and r["usage"]["output_tokens"] == 2
        p = fake.params[0]
        assert p["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "hi"}]
        assert p["max_new_tokens"] == 9 and p["delta"] and p["echo"] is False
        assert (await serving.retrieve("a", r["id"]))["id"] == r["id"]
        with pytest.raises(APIError) as e:
            await serving.retrieve("b", r["id"])  # another key's: unknown
        assert e.value.status == 404 and r["id"] in e.value.message

        # continued: the stored conversation, then the new input; instructions not carried
        streamed = await serving.create(req(input="more", previous_response_id=r["id"],
                                            stream=True), "rid2", "a", never_gone)
        assert isinstance(streamed, Streamed)
        body = b"".join([b async for b in streamed.body()])
        assert b"data: [DONE]" not in body
        events = [json.loads(block.split(b"\ndata: ", 1)[1])
                  for block in body.split(b"\n\n") if block.startswith(b"event: ")]
        assert events[-1]["type"] == "response.completed"
        assert fake.params[1]["messages"] == [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "Hello"},
                                              {"role": "user", "content": "more"}]
        second = events[-1]["response"]["id"]
        page = await serving.input_items("a", second, order="asc", limit=2)
        assert [i["role"] for i in page["data"]] == ["user", "assistant"] and page["has_more"]
        rest = await serving.input_items("a", second, order="asc", after=page["last_id"])
        assert [i["role"] for i in rest["data"]] == ["user"] and not rest["has_more"]
        newest = await serving.input_items("a", second)  # desc by default
        assert newest["data"][0]["content"][0]["text"] == "more"
        bad_limit = serving.input_items("a", second, limit="0")
        with pytest.raises(APIError):
            await bad_limit

        assert await serving.delete("a", second) == {"id": second, "object": "response.deleted",
                                                      "deleted": True}
        with pytest.raises(APIError) as e:
            await serving.delete("a", second)
        assert e.value.status == 404
        with pytest.raises(APIError) as e:
            await serving.create(req(previous_response_id=second), "rid3", "a", never_gone)
        assert e.value.status == 404 and e.value.param == "previous_response_id"

        unstored = plain(await serving.create(req(store=False), "rid4", "a", never_gone))
        with pytest.raises(APIError):
            await serving.retrieve("a", unstored["id"])
        store.close()

    asyncio.run(main())


def test_stream_error_frame_becomes_response_failed() -> None:
    async def main() -> None:
        fake = FakeTransport([{"text": "a"}, {"text": "oops", "error_code": 50001}])
        store = SqliteResponseStore(":memory:")
        serving = ResponsesServing(table_of(entry("m")), Pipeline(fake), store)
        streamed = await serving.create(req(stream=True), "rid", "", never_gone)
        assert isinstance(streamed, Streamed)
        body = b"".join([b async for b in streamed.body()])
        events = [json.loads(block.split(b"\ndata: ", 1)[1])
                  for block in body.split(b"\n\n") if block.startswith(b"event: ")]
        types = [e["type"] for e in events]
        assert types[:2] == ["response.created", "response.in_progress"]
        assert types[-1] == "response.failed"
        failed = events[-1]["response"]
        assert failed["error"]["code"] == "server_error" and "oops" in failed["error"]["message"]
        assert (await serving.retrieve("", failed["id"]))["status"] == "failed"
        store.close()

    asyncio.run(main())


def test_a_client_leaving_mid_stream_stops_the_workers_and_stores_nothing() -> None:
    async def main() -> None:
        fake = FakeTransport([{"text": "a"}, {"text": "b"}, {"text": "c", "finish_reason": "stop",
                                                              "usage": USAGE}])
        store = SqliteResponseStore(":memory:")
        serving = ResponsesServing(table_of(entry("m")), Pipeline(fake), store)
        streamed = await serving.create(req(stream=True), "rid", "", never_gone)
        assert isinstance(streamed, Streamed)
        body = streamed.body()
        seen = b""
        while b"response.output_text.delta" not in seen:  # the frames are being read
            seen += await body.__anext__()
        await body.aclose()  # what the server does when the client goes away
        assert fake.streams and all(s.closed for s in fake.streams)
        assert store.count() == 0
        # left before the first event: the streams opened for it are closed too
        streamed = await serving.create(req(stream=True), "rid2", "", never_gone)
        assert isinstance(streamed, Streamed)
        await streamed.body().aclose()
        await streamed.opening.close_if_unused()
        assert all(s.closed for s in fake.streams)
        store.close()

    asyncio.run(main())
