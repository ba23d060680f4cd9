"""The OpenAI Agents SDK (`openai-agents`) pointed at our API server, over both of its model APIs
(`OpenAIResponsesModel`: /v1/responses, streamed as the SDK always does; and
`OpenAIChatCompletionsModel`: /v1/chat/completions), with a function tool: the model calls the
tool, the SDK runs it and sends its output back, the run completes.

The bundled 135M model is made to call the tool with a named tool choice; the tool then turns
itself off (`is_enabled`), so the next turn (stateless: the call and its output are sent back
as input items / messages) answers in text and the run ends, however small the model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import Stack

agents = pytest.importorskip("agents")
from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI  # noqa: E402

set_tracing_disabled(True)  # else it exports traces to api.openai.com


def weather_agent(model: Any, calls: list[str], choice: str) -> Agent:
    @function_tool(is_enabled=lambda ctx, agent: not calls)
    def get_weather(city: str) -> str:
        """Return the weather now in a city."""
        calls.append(city)
        return f"sunny and 21 C in {city}"

    return Agent(name="weather", instructions="Answer briefly.", tools=[get_weather], model=model,
                 model_settings=ModelSettings(tool_choice=choice, parallel_tool_calls=False,
                                              max_tokens=60, temperature=0))


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agent_run_with_a_function_tool(stack: Stack, api: str) -> None:
    async def main() -> None:
        client = AsyncOpenAI(base_url=stack.api + "/v1", api_key="none", max_retries=0,
                             timeout=120)
        model = (OpenAIResponsesModel(model="smol", openai_client=client) if api == "responses"
                 else OpenAIChatCompletionsModel(model="smol", openai_client=client))
        calls: list[str] = []
        result = await Runner.run(weather_agent(model, calls, "get_weather"),
                                  "What is the weather in Paris?", max_turns=4)
        kinds = [type(i).__name__ for i in result.new_items]
        assert kinds == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
        assert len(calls) == 1 and calls[0]
        assert isinstance(result.final_output, str) and result.final_output
        await client.close()

    asyncio.run(main())


def test_agent_streamed_run_over_responses(stack: Stack) -> None:
    async def main() -> None:
        client = AsyncOpenAI(base_url=stack.api + "/v1", api_key="none", max_retries=0,
                             timeout=120)
        calls: list[str] = []
        agent = weather_agent(OpenAIResponsesModel(model="smol", openai_client=client), calls,
                              "required")
        result = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=4)
        kinds = [e.type async for e in result.stream_events()]
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
        assert len(calls) == 1 and result.is_complete and result.final_output
        await client.close()

    asyncio.run(main())
