"""Reasoning models through real processes and the official SDKs.

No reasoning model is on the package index; a reasoning model's serving path is its chat template
(which opens `<think>` after the assistant header, as DeepSeek-R1's does) plus a parser. So the
bundled SmolLM2 is given such a template (tests/data/smol-r1.jinja, detected as `deepseek_r1`)
on the llama.cpp engine (`r1`) and the transformers engine (`r1hf`), and a small thinking budget
makes every answer close its reasoning: the engine writes `</think>` itself past the budget.
`smol` (the same model with its own template, no parser) must be unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from conftest import Procs, api_models, registered, wait_for

TEMPLATE = str(Path(__file__).parent / "data" / "smol-r1.jinja")
ASK = [{"role": "user", "content": "What is 2+2?"}]
BUDGET = 4  # reasoning tokens before the engine closes the block
CLOSING = 6  # at most, the tokens of the closing the engine writes ("\n</think>\n\n")
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                         "maximum": 150}},
    "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


class Reasoners:
    def __init__(self, api: str) -> None:
        self.api = api
        self.client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0,
                                    timeout=120)
        self.claude = anthropic.Anthropic(base_url=api, api_key="none", max_retries=0,
                                          timeout=120)


@pytest.fixture(scope="module")
def reasoners(tmp_path_factory: pytest.TempPathFactory, smol_hf: Path) -> Iterator[Reasoners]:
    procs = Procs(tmp_path_factory.mktemp("reasoning-logs"))
    try:
        _, controller = procs.controller()
        _, r1 = procs.worker(controller, "r1", extra=("--chat-template", TEMPLATE))
        _, r1hf = procs.worker(controller, "r1hf", str(smol_hf), wait=False,
                               extra=("--engine", "transformers", "--chat-template", TEMPLATE))
        _, smol = procs.worker(controller, "smol")
        for url in (r1, r1hf, smol):
            wait_for(lambda url=url: registered(controller, url), 240, f"worker {url}")
        _, api = procs.api(controller)
        wait_for(lambda: api_models(api) >= {"r1", "r1hf", "smol"}, 30, "models in the API")
        yield Reasoners(api)
    finally:
        procs.stop_all()


def budget(n: int = BUDGET) -> dict[str, Any]:
    return {"reasoning": {"max_tokens": n}}


def no_tags(text: str | None) -> None:
    assert text is not None and "<think>" not in text and "</think>" not in text, text


@pytest.mark.parametrize("model", ["r1", "r1hf"])
def test_chat_reasoning_apart_from_the_content(reasoners: Reasoners, model: str) -> None:
    r = reasoners.client.chat.completions.create(model=model, messages=ASK, max_tokens=60,
                                                 temperature=0, extra_body=budget())
    m = r.choices[0].message
    reasoning = m.reasoning_content  # type: ignore[attr-defined]
    assert reasoning and m.reasoning == reasoning  # type: ignore[attr-defined]
    no_tags(m.content)
    no_tags(reasoning)
    assert m.content, "the budget closed the reasoning: an answer follows"
    spent = r.usage.completion_tokens_details.reasoning_tokens
    assert 0 < spent <= BUDGET + CLOSING and spent < r.usage.completion_tokens
    # streamed: every reasoning delta before the first content delta, the same texts
    stream = reasoners.client.chat.completions.create(
        model=model, messages=ASK, max_tokens=60, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=budget())
    order, thought, said, usage = [], "", "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            piece = getattr(c.delta, "reasoning_content", None)
            if piece:
                assert getattr(c.delta, "reasoning", None) == piece
                order.append("r")
                thought += piece
            if c.delta.content:
                order.append("c")
                said += c.delta.content
    assert order and order == sorted(order, key=lambda x: x == "c"), order
    assert (thought, said) == (reasoning, m.content)
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens == spent


def test_effort_none_switches_thinking_off_and_efforts_are_accepted(reasoners: Reasoners) -> None:
    r = reasoners.client.chat.completions.create(model="r1", messages=ASK, max_tokens=40,
                                                 temperature=0, reasoning_effort="none")  # type: ignore[arg-type]
    m = r.choices[0].message
    assert not getattr(m, "reasoning_content", None) and m.content
    no_tags(m.content)
    for effort in ("minimal", "low", "medium", "high"):
        r = reasoners.client.chat.completions.create(model="r1", messages=ASK, max_tokens=8,
                                                     reasoning_effort=effort)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        reasoners.client.chat.completions.create(model="r1", messages=ASK,
                                                 reasoning_effort="extreme")  # type: ignore[arg-type]
    assert e.value.body["param"] == "reasoning_effort"  # type: ignore[index]


@pytest.mark.parametrize("model", ["r1", "r1hf"])
def test_json_schema_after_reasoning_validates(reasoners: Reasoners, model: str) -> None:
    for prompt in ("Give me a person as JSON.", "Describe Ada Lovelace as JSON.",
                   "A cat named Tom, as JSON."):
        r = reasoners.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=80,
            temperature=0, extra_body=budget(), response_format={
                "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        m = r.choices[0].message
        assert m.reasoning_content  # type: ignore[attr-defined]
        jsonschema.validate(json.loads(m.content or ""), PERSON)


@pytest.mark.parametrize("model", ["r1", "r1hf"])
def test_a_forced_tool_call_after_reasoning_is_valid(reasoners: Reasoners, model: str) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = reasoners.client.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER], max_tokens=100, temperature=0,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=budget())
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.reasoning_content  # type: ignore[attr-defined]
    (call,) = c.message.tool_calls or []
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed: the call's pieces come after the reasoning and join into valid arguments
    stream = reasoners.client.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER], max_tokens=100, temperature=0, stream=True,  # type: ignore[list-item]
        tool_choice="required", extra_body=budget())
    args, thought, reasons = "", "", []
    for chunk in stream:
        for ch in chunk.choices:
            thought += getattr(ch.delta, "reasoning_content", None) or ""
            for d in ch.delta.tool_calls or []:
                assert thought, "the call comes after the reasoning"
                if d.index == 0:
                    args += d.function.arguments or ""
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert reasons == ["tool_calls"]
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_responses_reasoning_item(reasoners: Reasoners) -> None:
    rc = reasoners.client
    r = rc.responses.create(model="r1", input="What is 2+2?", max_output_tokens=60,
                            temperature=0, reasoning={"effort": "low", "max_tokens": BUDGET})  # type: ignore[typeddict-unknown-key]
    kinds = [o.type for o in r.output]
    assert kinds == ["reasoning", "message"], kinds
    item = r.output[0]
    text = "".join(c.text for c in item.content or [])  # type: ignore[union-attr]
    assert text and item.id.startswith("rs_")
    no_tags(r.output_text)
    assert r.output_text and 0 < r.usage.output_tokens_details.reasoning_tokens <= BUDGET + CLOSING
    assert r.reasoning.effort == "low"
    # streamed: the reasoning item's deltas, then the message's
    with rc.responses.stream(model="r1", input="What is 2+2?", max_output_tokens=60,
                             temperature=0, reasoning={"effort": "low", "max_tokens": BUDGET}  # type: ignore[typeddict-unknown-key]
                             ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in events
    assert events.index("response.reasoning_text.delta") < events.index(
        "response.output_text.delta")
    assert [o.type for o in final.output] == ["reasoning", "message"]
    # a reasoning item passed back in the input is accepted (and not shown to the model again)
    again = rc.responses.create(model="r1", max_output_tokens=30, temperature=0,
                                reasoning={"max_tokens": BUDGET},  # type: ignore[typeddict-unknown-key]
                                input=[{"role": "user", "content": "What is 2+2?"},
                                       *[o.model_dump(exclude_none=True) for o in r.output],
                                       {"role": "user", "content": "And 3+3?"}])
    assert again.status == "completed"
    # the R1 template drops earlier turns' reasoning: the same prompt as without the item
    without = rc.responses.create(model="r1", max_output_tokens=1, temperature=0,
                                  reasoning={"max_tokens": BUDGET},  # type: ignore[typeddict-unknown-key]
                                  input=[{"role": "user", "content": "What is 2+2?"},
                                         *[o.model_dump(exclude_none=True) for o in r.output
                                           if o.type != "reasoning"],
                                         {"role": "user", "content": "And 3+3?"}])
    assert again.usage and without.usage
    assert again.usage.input_tokens == without.usage.input_tokens


def test_messages_thinking_blocks(reasoners: Reasoners) -> None:
    claude = reasoners.claude
    m = claude.messages.create(model="r1", max_tokens=60, messages=ASK,  # type: ignore[list-item]
                               thinking={"type": "enabled", "budget_tokens": BUDGET},
                               extra_body={"temperature": 0})
    kinds = [b.type for b in m.content]
    assert kinds == ["thinking", "text"], kinds
    assert m.content[0].thinking and m.content[1].text  # type: ignore[union-attr]
    no_tags(m.content[1].text)  # type: ignore[union-attr]
    with claude.messages.stream(model="r1", max_tokens=60, messages=ASK,  # type: ignore[list-item]
                                thinking={"type": "enabled", "budget_tokens": BUDGET},
                                extra_body={"temperature": 0}) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "thinking_delta" in deltas and deltas.index("thinking_delta") < deltas.index("text_delta")
    assert [b.type for b in final.content] == ["thinking", "text"]
    off = claude.messages.create(model="r1", max_tokens=40, messages=ASK,  # type: ignore[list-item]
                                 thinking={"type": "disabled"}, extra_body={"temperature": 0})
    assert [b.type for b in off.content] == ["text"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="r1", max_tokens=10, messages=ASK,  # type: ignore[list-item]
                               thinking={"type": "enabled", "budget_tokens": 20})


def test_models_say_which_reason_and_a_model_without_a_parser_is_unchanged(
        reasoners: Reasoners) -> None:
    models = {m["id"]: m for m in httpx.get(reasoners.api + "/v1/models").json()["data"]}
    assert models["r1"]["reasoning"] == "deepseek_r1"
    assert models["r1hf"]["reasoning"] == "deepseek_r1"
    assert not models["smol"].get("reasoning")
    client = reasoners.client
    plain = client.chat.completions.create(model="smol", messages=ASK, max_tokens=30,
                                           temperature=0)
    asked = client.chat.completions.create(model="smol", messages=ASK, max_tokens=30,
                                           temperature=0, reasoning_effort="low",  # type: ignore[arg-type]
                                           extra_body=budget())
    assert asked.choices[0].message.content == plain.choices[0].message.content
    assert getattr(asked.choices[0].message, "reasoning_content", None) is None
    assert "reasoning_content" not in plain.choices[0].message.model_dump(exclude_none=True)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_llmrelay_chat_shows_the_reasoning_apart(reasoners: Reasoners, api: str) -> None:
    import argparse
    import io

    from llmrelay.chat_cli import Conversation, stream_answer

    conv = Conversation()
    conv.add_user("What is 2+2?")
    out, parts = io.StringIO(), []  # not a terminal: the reasoning between [thinking] marks
    stream_answer(reasoners.client, "r1", conv,
                  argparse.Namespace(temperature=0.0, max_tokens=40, api=api), out, parts)
    shown = out.getvalue()
    assert shown.startswith("[thinking] ") and " [/thinking]\n" in shown, shown
    thought = shown[len("[thinking] "):shown.index(" [/thinking]\n")]
    assert thought and thought not in "".join(parts)  # the answer (kept) holds no reasoning
    no_tags(shown)


def test_web_chat_shows_the_reasoning_collapsed_apart_from_the_answer(
        reasoners: Reasoners, tmp_path: Path) -> None:
    """The web chat (headless Chromium): a reasoning model's reasoning streams into a collapsed
    block above the answer, the answer holds none of it (nor its tags), and the note counts the
    reasoning tokens; the next turn sends back only the answer."""
    webui = pytest.importorskip("test_webui")  # skips without Chromium, as the web chat's tests
    from selenium.webdriver.common.by import By

    d = webui.new_browser(tmp_path / "profile")
    try:
        webui.open_chat(d, reasoners.api)
        webui.settings(d, "r1", 40)
        bubble = webui.send(d, "What is 2+2?")
        webui.until(d, lambda: webui.finished(bubble), "the answer")
        box = bubble.find_element(By.CSS_SELECTOR, "details.reasoning")
        assert box.get_attribute("open") is None  # collapsed until clicked
        thought = d.execute_script("return arguments[0].querySelector('.reasoning-text')"
                                   ".textContent", bubble)
        answer = bubble.find_element(By.CLASS_NAME, "body").text
        assert thought.strip(), bubble.text
        no_tags(thought)
        no_tags(answer)
        assert thought.strip() not in answer
        assert "of them reasoning" in bubble.find_element(By.CLASS_NAME, "note").text
        kept = d.execute_script("return JSON.stringify(chat.messages)")
        assert thought.strip() not in kept and "What is 2+2?" in kept, kept
    finally:
        d.quit()
