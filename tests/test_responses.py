"""The Responses API (`/v1/responses`) through the official `openai` SDK (strict response
validation: every field its types require) against the shared real stack (the bundled SmolLM2):
plain and message-list input, the streamed event sequence in order, `responses.stream(...)`,
the length limit, forced function calls valid against their schemas, a function_call_output
round trip via previous_response_id, retrieve / delete / input_items, json_schema output,
unsupported items and tools as 400s; with API servers of their own: the store surviving a
restart, and one key unable to read another's response."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from conftest import Procs, Stack

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather now in a city.",
           "strict": True,
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 40},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
ADD = {"type": "function", "name": "add", "description": "Add two integers.",
       "parameters": {"type": "object", "properties": {
           "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
SCHEMAS = {"get_weather": WEATHER["parameters"], "add": ADD["parameters"]}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "age": {"type": "integer"},
    "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "languages"], "additionalProperties": False}


@pytest.fixture()
def rc(stack: Stack) -> openai.OpenAI:
    """A client that checks every field the SDK's types require."""
    return stack.client(_strict_response_validation=True)


def test_plain_input(rc: openai.OpenAI) -> None:
    r = rc.responses.create(model="smol", input="Say hello.", max_output_tokens=30,
                            temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "smol"
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.output[0].type == "message" and r.output[0].id.startswith("msg_")
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.store is True and r.error is None


def test_message_list_input_and_instructions(rc: openai.OpenAI) -> None:
    r = rc.responses.create(model="smol", instructions="Answer in one word.", temperature=0,
                            max_output_tokens=20, input=[
                                {"role": "user", "content": "Name a colour."},
                                {"type": "message", "role": "assistant", "content": [
                                    {"type": "output_text", "text": "Blue."}]},
                                {"type": "message", "role": "user", "content": [
                                    {"type": "input_text", "text": "Another one?"}]}])
    assert r.output_text and r.instructions == "Answer in one word."
    items = rc.responses.input_items.list(r.id, order="asc")
    assert [i.role for i in items.data] == ["user", "assistant", "user"]  # type: ignore[union-attr]


def test_length_limit_is_incomplete(rc: openai.OpenAI) -> None:
    r = rc.responses.create(model="smol", input="Write a long story about a dragon.",
                            max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 3 and r.output_text


def test_streamed_events_in_order(rc: openai.OpenAI) -> None:
    types, deltas, seqs = [], [], []
    final = None
    for e in rc.responses.create(model="smol", input="Say hello.", max_output_tokens=30,
                                 temperature=0, stream=True):
        types.append(e.type)
        seqs.append(e.sequence_number)
        if e.type == "response.output_text.delta":
            deltas.append(e.delta)
        if e.type in ("response.completed", "response.incomplete"):
            final = e.response
    assert seqs == list(range(len(seqs)))
    n = len(deltas)
    assert n > 1
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", types[-1]]
    assert final is not None and final.output_text == "".join(deltas)
    assert final.usage is not None and 0 < final.usage.output_tokens <= 30
    # Not compared with a non-streamed answer: the two may come from the two workers, whose
    # caches and batches differ, and llama.cpp's logits differ with the batch a prompt is read
    # in (its server documents the same for cache_prompt); for this tiny quantized model enough
    # to pick another word (see Stack.wait_idle).


def test_sdk_stream_helper_final_response(rc: openai.OpenAI) -> None:
    with rc.responses.stream(model="smol", input="Name three fruits.", temperature=0,
                             max_output_tokens=40) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text and text
    assert rc.responses.retrieve(final.id).output_text == text  # stored as streamed


@pytest.mark.parametrize("choice, allowed", [
    ("required", {"get_weather", "add"}),
    ({"type": "function", "name": "add"}, {"add"}),
])
def test_forced_function_call_is_valid(rc: openai.OpenAI, choice: object,
                                       allowed: set[str]) -> None:
    r = rc.responses.create(model="smol", input="What is the weather in Paris?",
                            tools=[WEATHER, ADD], tool_choice=choice,  # type: ignore[arg-type]
                            parallel_tool_calls=False, max_output_tokens=120, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and r.status == "completed"
    c = calls[0]
    assert c.name in allowed and c.call_id.startswith("call_") and c.id.startswith("fc_")
    jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    assert r.tool_choice == (choice if isinstance(choice, str) else
                             openai.types.responses.ToolChoiceFunction(**choice))  # type: ignore[arg-type]


def test_streamed_function_call_with_the_stream_helper(rc: openai.OpenAI) -> None:
    with rc.responses.stream(model="smol", input="What is the weather in Paris?",
                             tools=[WEATHER], tool_choice="required", temperature=0,  # type: ignore[list-item]
                             parallel_tool_calls=False, max_output_tokens=120) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    call = next(o for o in final.output if o.type == "function_call")
    assert len(pieces) > 1 and "".join(pieces) == call.arguments
    assert call.parsed_arguments == json.loads(call.arguments)  # strict: parsed by the SDK
    jsonschema.validate(call.parsed_arguments, WEATHER["parameters"])


def test_function_call_output_round_trip_via_previous_response_id(rc: openai.OpenAI) -> None:
    first = rc.responses.create(model="smol", input="What is the weather in Paris?",
                                tools=[WEATHER], tool_choice="required", temperature=0,  # type: ignore[list-item]
                                parallel_tool_calls=False, max_output_tokens=120)
    call = next(o for o in first.output if o.type == "function_call")
    second = rc.responses.create(
        model="smol", previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none", temperature=0, max_output_tokens=40,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": json.dumps({"celsius": 21, "sky": "sunny"})}])
    assert second.previous_response_id == first.id and second.output_text
    assert all(o.type == "message" for o in second.output)
    items = rc.responses.input_items.list(second.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].call_id == call.call_id == items[2].call_id  # type: ignore[union-attr]
    # an output answering no call is a 400 naming the item
    with pytest.raises(openai.BadRequestError) as e:
        rc.responses.create(model="smol", previous_response_id=first.id, input=[
            {"type": "function_call_output", "call_id": "call_nope", "output": "x"}])
    assert e.value.body["param"] == "input[0].call_id"  # type: ignore[index]


def test_retrieve_delete_and_input_items(rc: openai.OpenAI, stack: Stack) -> None:
    r = rc.responses.create(model="smol", max_output_tokens=10, temperature=0, metadata={"t": "1"},
                            input=[{"role": "user", "content": f"Message {i}."} for i in range(5)])
    got = rc.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"t": "1"}
    page = rc.responses.input_items.list(r.id, limit=2)  # newest first by default
    assert [i.content[0].text for i in page.data] == ["Message 4.", "Message 3."]  # type: ignore[union-attr]
    assert page.has_more
    everything = [i.content[0].text for i in rc.responses.input_items.list(  # type: ignore[union-attr]
        r.id, limit=2, order="asc")]  # the SDK pages on by itself (after=last_id)
    assert everything == [f"Message {i}." for i in range(5)]
    for query in ("include[]=message.output_text.logprobs", "include=x", "stream=true"):
        raw = httpx.get(f"{stack.api}/v1/responses/{r.id}?{query}")
        assert raw.status_code == 400 and raw.json()["error"]["param"] in ("include", "stream")
    assert rc.responses.delete(r.id) is None
    for call in (lambda: rc.responses.retrieve(r.id), lambda: rc.responses.delete(r.id),
                 lambda: rc.responses.input_items.list(r.id)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert r.id in e.value.message
    raw = httpx.delete(f"{stack.api}/v1/responses/resp_nope")
    assert raw.status_code == 404 and raw.json()["error"]["message"] == \
        "Response with id 'resp_nope' not found."
    unstored = rc.responses.create(model="smol", input="Hi.", store=False, max_output_tokens=5)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        rc.responses.retrieve(unstored.id)


class City(BaseModel):
    name: str
    country: str


def test_json_schema_output(rc: openai.OpenAI) -> None:
    r = rc.responses.create(model="smol", input="Describe a person as JSON.", temperature=0,
                            max_output_tokens=150, text={"format": {
                                "type": "json_schema", "name": "person", "schema": PERSON,
                                "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    parsed = rc.responses.parse(model="smol", input="Tell me about Paris.", text_format=City,
                                temperature=0, max_output_tokens=100)
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.name
    obj = rc.responses.create(model="smol", input="Give a JSON object with a name and an age.",
                              temperature=0, max_output_tokens=100,
                              text={"format": {"type": "json_object"}})
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict)


@pytest.mark.parametrize("kw, param, word", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].file_id", "file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type", "input_file"),
    ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]},
     "input[0].type", "web_search_call"),
    ({"input": "Hi.", "tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
    ({"input": "Hi.", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
     "tools[0].type", "file_search"),
    ({"input": "Hi.", "background": True}, "background", "background"),
    ({"input": "Hi.", "include": ["file_search_call.results"]}, "include[0]", "include"),
    ({"input": "Hi.", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"input": "Hi.", "previous_response_id": "resp_unknown"}, "previous_response_id",
     "resp_unknown"),
])
def test_bad_input_is_a_clear_4xx(rc: openai.OpenAI, kw: dict, param: str, word: str) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        rc.responses.create(model="smol", **kw)
    err = e.value
    assert err.status_code in (400, 404) and err.body["param"] == param  # type: ignore[index]
    assert word in err.message
    assert err.status_code == (404 if param == "previous_response_id" else 400)


def test_unknown_model_is_a_404(rc: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        rc.responses.create(model="smoll", input="Hi.")
    assert "smol" in e.value.message


# ---- API servers of their own ----------------------------------------------------------------------


def own_client(api: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api + "/v1", api_key=key, max_retries=0, timeout=120,
                         _strict_response_validation=True)


def test_store_survives_an_api_server_restart(stack: Stack, procs: Procs, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    proc, api = procs.api(stack.controller, extra=("--data-dir", data))
    c = own_client(api, "none")
    first = c.responses.create(model="smol", input="My name is Ada.", max_output_tokens=10,
                               temperature=0)
    port = api.rsplit(":", 1)[1]
    proc.stop()
    _, api = procs.api(stack.controller, port=int(port), extra=("--data-dir", data))
    c = own_client(api, "none")
    assert c.responses.retrieve(first.id).output_text == first.output_text
    again = c.responses.create(model="smol", input="What is my name?", temperature=0,
                               previous_response_id=first.id, max_output_tokens=10)
    items = c.responses.input_items.list(again.id, order="asc").data
    assert [i.type for i in items] == ["message"] * 3
    assert (Path(data) / "responses.sqlite").exists()


def test_one_key_cannot_read_anothers_response(stack: Stack, procs: Procs,
                                               tmp_path: Path) -> None:
    _, api = procs.api(stack.controller, extra=("--api-keys", "key-one,key-two",
                                                "--data-dir", str(tmp_path / "data")))
    one, two = own_client(api, "key-one"), own_client(api, "key-two")
    r = one.responses.create(model="smol", input="A secret.", max_output_tokens=5)
    assert one.responses.retrieve(r.id).id == r.id
    for call in (lambda: two.responses.retrieve(r.id), lambda: two.responses.delete(r.id),
                 lambda: two.responses.input_items.list(r.id),
                 lambda: two.responses.create(model="smol", input="And?",
                                              previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.AuthenticationError):
        own_client(api, "key-three").responses.retrieve(r.id)
    assert one.responses.retrieve(r.id).id == r.id  # still there for its owner
    db = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir()  # WAL included
                  if p.is_file())
    assert b"key-one" not in db and b"key-two" not in db  # keys are never stored
