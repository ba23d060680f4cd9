"""The OpenAI surface through the official `openai` SDK against the shared real stack."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import Stack, wait_for

Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list_shows_every_served_model(client: openai.OpenAI) -> None:
    # (a worker another module started on the shared controller leaves the table within a
    # refresh of its deregistration)
    wait_for(lambda: sorted(m.id for m in client.models.list().data) == ["gemma", "smol"], 15,
             "the shared stack's models only")
    models = client.models.list()
    assert all(m.object == "model" and m.owned_by == "llmrelay" for m in models.data)
    assert client.models.retrieve("smol").id == "smol"


def test_chat_non_stream(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smol", messages=Q, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_non_stream_at_temperature_zero(client: openai.OpenAI, stack: Stack) -> None:
    stack.wait_idle()
    full = client.chat.completions.create(model="smol", messages=Q, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="smol", messages=Q, max_tokens=24,
                                            temperature=0, stream=True)
    parts, roles, reasons = [], [], []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert roles == ["assistant"]
    assert len(parts) > 1, "the answer must arrive in several chunks"
    assert "".join(parts) == full.choices[0].message.content
    assert reasons == [full.choices[0].finish_reason]


def test_stream_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smol", messages=Q, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_multi_turn_uses_history(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "My name is Alice."},
        {"role": "assistant", "content": "Nice to meet you, Alice."},
        {"role": "user", "content": "What is my name?"},
    ]
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                       temperature=0)
    short = client.chat.completions.create(model="smol", messages=messages[-1:], max_tokens=16,
                                           temperature=0)
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 10
    assert "Alice" in r.choices[0].message.content


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    kw = dict(model="smol", messages=Q, max_tokens=16, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    answers = {client.chat.completions.create(**{**kw, "seed": s}).choices[0].message.content
               for s in range(5)}
    assert len(answers) > 1, "different seeds should give different samples at temperature 1"


def test_n_choices_and_max_completion_tokens(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smol", messages=Q, n=2, max_completion_tokens=6,
                                       temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="smol", messages=Q, n=2, max_tokens=4,
                                            stream=True)
    finished = {c.index for ch in stream for c in ch.choices if c.finish_reason}
    assert finished == {0, 1}


def test_stop_string_is_not_included(client: openai.OpenAI) -> None:
    base = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                     temperature=0)
    text = base.choices[0].text
    assert " 7" in text, text
    cut = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                    temperature=0, stop=[" 7"])
    assert cut.choices[0].text == text[: text.index(" 7")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop=" 7",
        stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_sampling_parameters_take_effect(client: openai.OpenAI) -> None:
    def complete(**kw: object) -> str:
        return client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=16,
                                         **kw).choices[0].text  # type: ignore[arg-type]

    greedy = complete(temperature=0)
    # top_k=1 and a tiny top_p leave only the most likely token: sampling becomes greedy
    assert complete(temperature=1.0, extra_body={"top_k": 1}, seed=1) == greedy
    assert complete(temperature=1.0, top_p=0.001, seed=2) == greedy
    # penalties on repeated tokens change a repetitive continuation
    assert complete(temperature=0, frequency_penalty=2.0) != greedy
    assert complete(temperature=0, presence_penalty=2.0) != greedy
    # max_tokens bounds the answer
    short = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=3,
                                      temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smol", messages=Q, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_completions_forms(client: openai.OpenAI) -> None:
    r = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8,
                                  temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    assert r.object == "text_completion"
    assert c.text.startswith("Once upon a time")
    assert len(c.logprobs.tokens) == r.usage.completion_tokens
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    # Offsets point into the returned text, past the echoed prompt, streamed or not.
    assert c.logprobs.text_offset[0] == len("Once upon a time")
    for token, offset in zip(c.logprobs.tokens, c.logprobs.text_offset, strict=True):
        assert c.text[offset:offset + len(token)] == token
    streamed = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8,
                                         temperature=0, logprobs=2, echo=True, stream=True)
    assert [o for ch in streamed if ch.choices and ch.choices[0].logprobs
            for o in ch.choices[0].logprobs.text_offset] == c.logprobs.text_offset
    plain = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8,
                                      temperature=0)
    assert c.text == "Once upon a time" + plain.choices[0].text
    two = client.completions.create(model="smol", prompt=["Hello", "The sky is"], max_tokens=4,
                                    temperature=0)
    assert [ch.index for ch in two.choices] == [0, 1]
    ids = client.completions.create(model="smol", prompt=[1, 9690, 198], max_tokens=4,
                                    temperature=0)
    assert ids.usage.prompt_tokens == 3
    stream = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == plain.choices[0].text


def test_two_models_are_routed_by_name(stack: Stack, client: openai.OpenAI) -> None:
    before = httpx.post(stack.gemma_worker + "/worker_get_status").json()["llmrelay"]["served"]
    r = client.chat.completions.create(model="gemma", messages=Q, max_tokens=8, temperature=0)
    assert r.model == "gemma"
    assert r.choices[0].message.content.strip(), "Gemma (no template of its own) must answer"
    after = httpx.post(stack.gemma_worker + "/worker_get_status").json()["llmrelay"]["served"]
    assert after == before + 1


def test_two_workers_share_the_load(stack: Stack, client: openai.OpenAI) -> None:
    def served() -> list[int]:
        return [httpx.post(w + "/worker_get_status").json()["llmrelay"]["served"]
                for w in stack.smol_workers]

    before = served()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: client.chat.completions.create(
            model="smol", messages=Q, max_tokens=24, temperature=0), range(12)))
    delta = [a - b for a, b in zip(served(), before, strict=True)]
    assert sum(delta) == 12
    assert min(delta) >= 3, f"one worker got almost everything: {delta}"


# -- errors ------------------------------------------------------------------------------------

def test_unknown_model_is_404_with_closest_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="Smol", messages=Q)
    err = e.value.body
    assert e.value.code == "model_not_found"
    assert "smol" in err["message"] and "gemma" in err["message"]
    assert "Did you mean 'smol'" in err["message"]


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"n": 1000}, "n"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    # (tools are served since issue 15: a tool result must answer an earlier call, and only
    # function tools exist; tests/test_tools.py has the rest)
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
     "messages[0].tool_call_id"),
    ({"tools": [{"type": "code_interpreter", "function": {"name": "f"}}]}, "tools[0].type"),
])
def test_bad_parameters_are_400_naming_the_parameter(client: openai.OpenAI, kwargs: dict,
                                                      param: str) -> None:
    args = {"model": "smol", "messages": Q, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["message"]


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    long = "word " * 3000  # the shared workers run with a 2048-token context
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": long}])
    assert e.value.code == "context_length_exceeded"
    assert "2048" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": long}],
                                       stream=True)
    assert e.value.code == "context_length_exceeded"


def test_malformed_bodies_get_openai_errors(stack: Stack) -> None:
    url = stack.api + "/v1/chat/completions"
    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"messages": Q}).encode(), 400),  # no model
        (json.dumps({"model": "smol", "messages": "hi"}).encode(), 400),
        (b"\xff\xfe\x00garbage", 400),
    ]
    for body, status in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    r = httpx.get(stack.api + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_request_id_and_cors(stack: Stack) -> None:
    r = httpx.get(stack.api + "/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.post(stack.api + "/v1/chat/completions",
                   json={"model": "smol", "messages": Q, "max_tokens": 1},
                   headers={"X-Request-ID": "trace-42"})
    assert r.json()["id"] == "chatcmpl-trace-42"
    pre = httpx.options(stack.api + "/v1/chat/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] in ("*", "http://example.test")


def test_sse_framing_and_proxy_headers(stack: Stack) -> None:
    with httpx.stream("POST", stack.api + "/v1/chat/completions", json={
            "model": "smol", "messages": Q, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
