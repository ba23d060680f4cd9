"""Tool choices mean what the providers document, on every door (the shared stack: SmolLM2 on
llama.cpp), with the official SDKs:

- a named choice with `parallel_tool_calls` left at its default is exactly one call of that
  function, and the turn ends (`finish_reason: "tool_calls"`, Responses `completed`, Anthropic
  `stop_reason: "tool_use"`), on a few dozen prompts, sampled;
- `required` with parallel calls on never repeats a call already made in the turn, and every
  call returned parses (the Agents SDK's run over the Responses API completes);
- an answer cut by `max_tokens` inside the opening tag of a further call never returns that
  fragment as text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
from test_tools import SCHEMAS, TOOLS

from conftest import Stack

CITIES = ["Paris", "Lyon", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Rome", "Kyiv",
          "Dakar", "Hanoi"]
PROMPTS = ([f"What is the weather in {c}? And in {d}?" for c, d in zip(CITIES, CITIES[1:], strict=False)]
           + [f"Is it warm in {c} today? Check the weather in {c} and in every city near it."
              for c in CITIES[:12]]
           + [f"Add {a} and {a * 3}, then tell me the weather in {c}." for a, c in
              zip(range(3, 13), CITIES[:10], strict=True)])  # 33 prompts


def _sweep(fn: Any, items: list[Any]) -> None:
    """Run fn over items, four at a time (the stack has two `smol` workers)."""
    async def main() -> None:
        sem = asyncio.Semaphore(4)

        async def one(item: Any) -> None:
            async with sem:
                await asyncio.to_thread(fn, item)
        await asyncio.gather(*(one(i) for i in items))
    asyncio.run(main())


def test_a_named_choice_is_exactly_one_call_on_chat(client: openai.OpenAI) -> None:
    def one(prompt: str) -> None:
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": prompt}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=150, temperature=1.0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", (prompt, c)
        assert c.message.content is None, (prompt, c.message.content)
        calls = c.message.tool_calls or []
        assert len(calls) == 1 and calls[0].function.name == "get_weather", (prompt, calls)
        jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["get_weather"])
    _sweep(one, PROMPTS)


def test_a_named_choice_streamed_is_one_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": PROMPTS[0]}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=150,
        temperature=1.0, stream=True)
    indexes, reasons, text = set(), [], ""
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            indexes |= {d.index for d in c.delta.tool_calls or []}
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert indexes == {0} and reasons == ["tool_calls"] and text == ""


def test_a_named_function_on_responses_is_one_call_and_completed(stack: Stack) -> None:
    rc = openai.OpenAI(base_url=stack.api + "/v1", api_key="none", max_retries=0, timeout=120)
    tools = [{"type": "function", **t["function"]} for t in TOOLS]

    def one(prompt: str) -> None:
        r = rc.responses.create(model="smol", input=prompt, tools=tools,  # type: ignore[arg-type]
                                tool_choice={"type": "function", "name": "get_weather"},
                                max_output_tokens=150, temperature=1.0)
        calls = [o for o in r.output if o.type == "function_call"]
        assert r.status == "completed", (prompt, r.status, r.incomplete_details)
        assert len(calls) == 1 and calls[0].name == "get_weather", (prompt, r.output)
        assert not [o for o in r.output if o.type == "message"], r.output
    _sweep(one, PROMPTS[:8])


def test_a_named_tool_on_messages_ends_with_tool_use(stack: Stack) -> None:
    claude = anthropic.Anthropic(base_url=stack.api, api_key="none", max_retries=0, timeout=120)
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]

    def one(prompt: str) -> None:
        m = claude.messages.create(model="smol", max_tokens=150, tools=tools,  # type: ignore[arg-type]
                                   messages=[{"role": "user", "content": prompt}],
                                   tool_choice={"type": "tool", "name": "get_weather"},
                                   extra_body={"temperature": 1.0})
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use", (prompt, m.stop_reason)
        assert len(uses) == 1 and uses[0].name == "get_weather", (prompt, m.content)
        assert not [b for b in m.content if b.type == "text"], m.content
    _sweep(one, PROMPTS[:8])


def test_required_with_parallel_calls_never_repeats_a_call(client: openai.OpenAI) -> None:
    def one(prompt: str) -> None:
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": prompt}], tools=TOOLS,
            tool_choice="required", max_tokens=300, temperature=0.7)
        c = r.choices[0]
        calls = c.message.tool_calls or []
        # every call whole (one cut short by the length limit is dropped), none made twice
        made = [(x.function.name, json.dumps(json.loads(x.function.arguments), sort_keys=True))
                for x in calls]
        assert calls and len(made) == len(set(made)), (prompt, made)
        assert c.finish_reason in ("tool_calls", "length"), (prompt, c.finish_reason, made)
    _sweep(one, PROMPTS[:8])


def test_a_cut_at_a_further_calls_marker_returns_no_text(client: openai.OpenAI) -> None:
    """Greedy, so every cut is a prefix of the same answer: sweep max_tokens from the end of the
    first call over where the second call's `<tool_call>` is written (the second call itself is
    held until whole, so it is not seen before)."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    whole = client.chat.completions.create(model="smol", messages=ask, tools=TOOLS,
                                           tool_choice="required", max_tokens=300, temperature=0)
    calls = whole.choices[0].message.tool_calls or []
    assert len(calls) >= 2, "the greedy answer makes two calls (what this test cuts into)"

    def first_call_tokens(n: int) -> tuple[int, str | None]:
        r = client.chat.completions.create(model="smol", messages=ask, tools=TOOLS,
                                           tool_choice="required", max_tokens=n, temperature=0)
        m = r.choices[0].message
        return len(m.tool_calls or []), m.content

    # the smallest cut with one whole call, then the next few tokens: the marker of the next
    lo, hi = 1, whole.usage.completion_tokens
    while lo < hi:  # the first cut at which the first call parses
        mid = (lo + hi) // 2
        r = client.chat.completions.create(model="smol", messages=ask, tools=TOOLS,
                                           tool_choice="required", max_tokens=mid, temperature=0)
        m = r.choices[0].message
        if m.tool_calls and _parses(m.tool_calls[0].function.arguments):
            hi = mid
        else:
            lo = mid + 1
    # the first call's closing marker, then the next one's opening marker: about 12 tokens
    seen = []
    for n in range(lo, min(lo + 16, whole.usage.completion_tokens)):
        count, content = first_call_tokens(n)
        seen.append((n, count, content))
        assert not content, seen


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("parallel", [True, None])
def test_agents_sdk_run_with_required_over_responses_completes(stack: Stack,
                                                               parallel: bool | None) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=stack.api + "/v1", api_key="none", max_retries=0,
                                    timeout=120)
        calls: list[str] = []

        @function_tool(is_enabled=lambda ctx, agent: not calls)
        def get_weather(city: str) -> str:
            """Return the weather now in a city."""
            calls.append(city)
            return f"sunny and 21 C in {city}"

        agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                      model=OpenAIResponsesModel(model="smol", openai_client=client),
                      model_settings=ModelSettings(tool_choice="required", max_tokens=200,
                                                   parallel_tool_calls=parallel, temperature=0))
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        assert calls and result.final_output
        await client.close()

    asyncio.run(main())
