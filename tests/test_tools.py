"""Tools, structured output and logit_bias through the official `openai` SDK against the shared
real stack (the bundled SmolLM2 on the llama.cpp engine): calls valid against their schemas,
streamed and not; a tool-result round trip; JSON answers valid against strict schemas; the SDK's
`.parse()`; and every bad input a clear 400 naming the parameter."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

import structured_cases
from conftest import Stack

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls: list, allowed: set[str]) -> None:
    assert calls, "no tool call"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("choice, allowed", [
    ("required", {"get_weather", "add"}),
    ({"type": "function", "function": {"name": "add"}}, {"add"}),
])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_calls_are_valid_against_their_schemas(client: openai.OpenAI, choice: object,
                                                      allowed: set[str], temperature: float) -> None:
    r = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS,
                                       tool_choice=choice, max_tokens=120,
                                       temperature=temperature, parallel_tool_calls=False)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls"
    check_calls(choice0.message.tool_calls, allowed)
    assert len(choice0.message.tool_calls) == 1  # parallel_tool_calls=False
    assert r.usage.completion_tokens > 0


def test_streamed_calls_come_in_openai_delta_shape(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS,
                                            tool_choice="required", max_tokens=120,
                                            temperature=0, stream=True,
                                            parallel_tool_calls=False)
    firsts, pieces, reasons = {}, {}, []
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.id:
                    assert d.function.name and d.index not in firsts
                    firsts[d.index] = (d.id, d.function.name)
                    pieces[d.index] = [d.function.arguments or ""]
                else:
                    assert d.index in firsts and not d.function.name
                    pieces[d.index].append(d.function.arguments or "")
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["tool_calls"] and firsts
    for i, (_, name) in firsts.items():
        assert sum(1 for p in pieces[i] if p) > 1, "the arguments must arrive in pieces"
        jsonschema.validate(json.loads("".join(pieces[i])), SCHEMAS[name])
    whole = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=120, temperature=0,
                                           parallel_tool_calls=False)
    assert [c.function.arguments for c in whole.choices[0].message.tool_calls] == \
        ["".join(pieces[i]) for i in sorted(pieces)]


def test_parallel_calls_each_valid(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, max_tokens=200,
                                       tool_choice="required", temperature=0)
    calls = r.choices[0].message.tool_calls
    complete = [c for c in calls if _parses(c.function.arguments)]
    check_calls(complete, {"get_weather", "add"})
    assert len(complete) >= 2 and len({c.id for c in calls}) == len(calls)
    # only the last call may be cut short, by the length limit
    assert len(complete) == len(calls) or (len(complete) == len(calls) - 1
                                           and r.choices[0].finish_reason == "length")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="smol", messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    assert history[1].get("content") is None  # the call came alone: content null
    r = client.chat.completions.create(model="smol", messages=history, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    # With "auto" the model may answer or call again; either way the answer is well formed.
    r = client.chat.completions.create(model="smol", messages=history, tools=TOOLS,
                                       tool_choice="auto", temperature=0, max_tokens=60)
    msg = r.choices[0].message
    if msg.tool_calls:
        check_calls(msg.tool_calls, {"get_weather", "add"})
        assert r.choices[0].finish_reason == "tool_calls"
    else:
        assert msg.content and "<tool_call>" not in msg.content


@pytest.mark.parametrize("stream", [False, True])
def test_auto_is_well_formed_either_way(client: openai.OpenAI, stream: bool) -> None:
    for temperature in (0.0, 1.0):
        kw = dict(model="smol", messages=[{"role": "user", "content": "Add 2 and 3."}],
                  tools=TOOLS, tool_choice="auto", temperature=temperature, max_tokens=80)
        if not stream:
            r = client.chat.completions.create(**kw)
            content, calls = r.choices[0].message.content, r.choices[0].message.tool_calls or []
        else:
            content, calls, args = "", {}, {}
            for chunk in client.chat.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    content += c.delta.content or ""
                    for d in c.delta.tool_calls or []:
                        if d.id:
                            calls[d.index] = d.function.name
                        args[d.index] = args.get(d.index, "") + (d.function.arguments or "")
            for i, name in calls.items():
                jsonschema.validate(json.loads(args[i]), SCHEMAS[name])
            calls = list(calls.values())
        assert "<tool_call>" not in (content or "")
        if not stream and calls:
            check_calls(calls, {"get_weather", "add"})


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "age": {"type": "integer"},
    "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "languages"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_and_json_object_answers_are_valid(client: openai.OpenAI, stream: bool) -> None:
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    formats = [{"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                       "strict": True}},
               {"type": "json_object"}]
    for fmt in formats:
        kw = dict(model="smol", messages=ask, response_format=fmt, temperature=0.7,
                  max_tokens=150, seed=7)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kw) if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].message.content
        value = json.loads(text)
        if fmt["type"] == "json_schema":
            jsonschema.validate(value, PERSON)
        else:
            assert isinstance(value, dict)


class City(BaseModel):
    name: str
    country: str
    population: int


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="smol", messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=City, temperature=0, max_tokens=100)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_sdk_parse_with_bounds_stays_within_them(client: openai.OpenAI) -> None:
    """A pydantic model with Field(ge=0, le=150) and max_length (minimum/maximum/maxLength in
    the SDK's strict schema) through `.parse()`: accepted and respected, over several prompts."""
    structured_cases.parse_people(client, "smol")


@pytest.mark.parametrize("stream", [False, True])
def test_every_strict_mode_keyword_family_is_enforced(client: openai.OpenAI, stream: bool) -> None:
    structured_cases.every_family(client, "smol", stream)


def test_unenforceable_keywords_are_refused_naming_them(client: openai.OpenAI) -> None:
    refused = structured_cases.refusals(client, "smol")
    assert all(b["code"] == "invalid_value" for b in refused.values()), refused


def test_logit_bias_changes_the_greedy_answer(client: openai.OpenAI) -> None:
    kw = dict(model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
              temperature=0, max_tokens=6)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    favoured = client.chat.completions.create(**kw, logit_bias={"1000": 100})
    text = favoured.choices[0].message.content
    assert text != plain
    # token 1000 pushed up by 100 wins every step: the answer is that token, repeated
    again = client.chat.completions.create(**kw, logit_bias={"1000": 100}).choices[0].message
    assert again.content == text and len(set(text.split())) <= 2
    comp = dict(model="smol", prompt="The capital of France is", temperature=0, max_tokens=4)
    a = client.completions.create(**comp).choices[0].text
    b = client.completions.create(**comp, logit_bias={"1000": 100}).choices[0].text
    assert a != b and b == text[: len(b)] or b


@pytest.mark.parametrize("kwargs, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters", "not a valid JSON schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "letters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                               "schema": {"type": "nothing"}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "not supported"),
    ({"logit_bias": {"12": 500}}, "logit_bias", "-100 to 100"),
    ({"functions": [{"name": "f"}]}, "functions", "deprecated"),
])
def test_bad_tool_input_is_a_400_naming_the_parameter(client: openai.OpenAI, kwargs: dict,
                                                      param: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=ASK, max_tokens=5,
                                       **kwargs)  # type: ignore[arg-type]
    err = e.value.body
    assert err["param"] == param and words in err["message"], err


def test_unmatched_tool_result_and_unenforceable_keyword(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", max_tokens=5, messages=[
            *ASK, {"role": "tool", "tool_call_id": "call_nobody", "content": "21 C"}])
    assert e.value.body["param"] == "messages[1].tool_call_id"
    unique = {"type": "function", "function": {"name": "tags", "parameters": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=ASK, tools=[unique],
                                       tool_choice="required", max_tokens=5)
    assert '"uniqueItems"' in e.value.body["message"]
    # the worker keeps serving
    assert client.chat.completions.create(model="smol", messages=ASK, max_tokens=3).choices


def test_models_list_what_they_honour(client: openai.OpenAI) -> None:
    smol = client.models.retrieve("smol").model_dump()
    assert {"chat", "tools", "json_schema", "logit_bias", "logprobs"} <= set(smol["features"])
    assert smol["context_length"] == 2048


def test_langchain_bind_tools_and_structured_output(stack: Stack) -> None:
    """LangChain's ChatOpenAI pointed at us: bind_tools with a forced tool, and
    with_structured_output (its json_schema method, the SDK's strict schema)."""
    from langchain_core.tools import tool as lc_tool
    from langchain_openai import ChatOpenAI

    @lc_tool
    def get_weather(city: str, unit: str) -> str:
        """The weather now in a city, in celsius or fahrenheit."""
        return "sunny"

    llm = ChatOpenAI(model="smol", base_url=stack.api + "/v1", api_key="none", temperature=0,
                     max_tokens=120, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert set(msg.tool_calls[0]["args"]) == {"city", "unit"}

    class Person(BaseModel):
        name: str
        age: int

    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person) and person.name


def test_llamacpp_grammar_dead_end_ends_only_that_request() -> None:
    """In process, with the real model: a constraint whose every next token is banned (a -inf
    bias, which only the worker's own wire allows) ends that request with a clear error; the
    engine then serves the next; a constraint is compiled once however often it is asked."""
    import asyncio
    import math

    from llmrelay.worker.constraints import Constraint
    from llmrelay.worker.engines.base import EngineError, GenerationRequest
    from llmrelay.worker.engines.llamacpp import Options, load
    from llmrelay.worker.models import resolve

    engine = load(Options(resolve("smollm2").path, context_length=512, n_threads=1, parallel=2))
    quote = {t for t in range(engine.vocab_size()) if engine.detokenize([t]).startswith('"')}

    async def go() -> None:
        digits = Constraint(schema={"type": "string"})  # must begin with a quote
        dead = GenerationRequest(prompt="Say it:", max_new_tokens=8, temperature=0,
                                 constraint=digits, logit_bias={t: -math.inf for t in quote})
        with pytest.raises(EngineError, match="allows no next token"):
            async for _ in engine.generate(dead):
                pass
        for _ in range(3):
            ok = GenerationRequest(prompt="Say it:", max_new_tokens=8, temperature=0,
                                   constraint=Constraint(schema={"type": "string"}))
            text = "".join([c.text async for c in engine.generate(ok)])
            assert text.startswith('"')
        assert engine.grammars.compiled == 1  # one distinct constraint, compiled once

    try:
        asyncio.run(go())
    finally:
        engine.close()


def test_llamacpp_constrained_draw_asks_the_matcher_about_the_chains_pick_first() -> None:
    """In process: when the matcher allows the chain's pick, that token is taken without a mask
    over the whole vocabulary; when it refuses it, the mask is computed once and the chain picks
    the likeliest token it allows."""
    import llama_cpp
    import llguidance
    import numpy as np

    from llmrelay.worker.engines.guidance import Guide
    from llmrelay.worker.engines.llamacpp import sampling
    from llmrelay.worker.models import resolve

    llm = llama_cpp.Llama(str(resolve("smollm2").path), n_ctx=256, n_threads=1, verbose=False)
    ctx, vocab = llm._ctx.ctx, llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    prompt = llm.tokenize(b"The capital of France is", add_bos=True)
    tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(prompt))) == 0
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    order = [int(t) for t in np.argsort(-logits)]
    # the likeliest token whose text is plain letters, and not the greedy one
    second = next(t for t in order[1:50] if llm.detokenize([t]).decode().strip().isalpha())
    grammars = sampling.grammars(vocab, n_vocab)
    cands = sampling.Candidates(n_vocab)
    greedy = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(greedy, llama_cpp.llama_sampler_init_greedy())

    def guide(text: str) -> tuple[Guide, list[int]]:
        lark = llguidance.LLMatcher.grammar_from_lark(f"start: {json.dumps(text)}")
        g = Guide(grammars, llguidance.LLMatcher(grammars.tokenizer, lark, log_level=0), None)
        masks: list[int] = []
        allowed = g.allowed
        g.allowed = lambda width: masks.append(width) or allowed(width)  # type: ignore[method-assign]
        return g, masks

    try:
        for target, masked in ((order[0], False), (second, True)):
            g, masks = guide(llm.detokenize([target]).decode())
            token = sampling.sample_constrained(cands, ctx, -1, greedy, g)
            assert token == target and len(masks) == (1 if masked else 0)
            assert g.matcher.is_accepting()  # the guide took the token
    finally:
        llama_cpp.llama_sampler_free(greedy)
        llm.close()


def test_llamacpp_constrained_strings_refuse_raw_control_characters() -> None:
    """JSON strings cannot hold a raw newline or tab (no JSON parser accepts them); an escaped
    one is fine."""
    import llama_cpp

    from llmrelay.worker.constraints import Constraint
    from llmrelay.worker.engines.llamacpp import sampling
    from llmrelay.worker.models import resolve

    llm = llama_cpp.Llama(str(resolve("smollm2").path), n_ctx=64, n_threads=1, verbose=False,
                          vocab_only=True)
    vocab = llm._model.vocab

    def one(text: str) -> int:
        (token,) = llm.tokenize(text.encode(), add_bos=False, special=False)
        return token

    try:
        grammars = sampling.grammars(vocab, llama_cpp.llama_vocab_n_tokens(vocab))
        guide = grammars.guide(Constraint(schema={
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}))
        guide.feed(llm.tokenize(b'{"a": "x', add_bos=False))
        assert not guide.allows(one("\n")) and not guide.allows(one("\t"))
        assert guide.allows(one("y"))
        assert guide.allows(one("\\"))  # an escape: \n written as two characters
        allowed = guide.allowed(llama_cpp.llama_vocab_n_tokens(vocab))
        assert allowed[one("y")] and not allowed[one("\n")]
    finally:
        llm.close()
