"""Chat completions: a request -> its Plan (`to_plan`; our workers get the `messages` and render
them with the model's own template; the transport translates them for FastChat's workers) ->
the workers' typed frames shaped into OpenAI's chat objects and chunks.

`ChatServing.create` is the whole endpoint with plain arguments; `response` and `chunks` shape
frames alone, so tests can feed them frames without a server or a worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.types import Receive

from llmrelay.api.chat.protocol import (
    ArgumentsDelta,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionUsageChunk,
    ChatLogprobs,
    ChatMessageOut,
    ChatMessageReasoned,
    ChatMessageReasonedWithCalls,
    ChatMessageWithCalls,
    ChunkChoice,
    ContentDelta,
    EndDelta,
    FirstToolCallDelta,
    FunctionCallOut,
    NamedArgumentsDelta,
    ReasoningDelta,
    RoleDelta,
    ToolCallDelta,
    ToolCallOut,
    ToolCallsDelta,
    normalize_messages,
)
from llmrelay.api.errors import bad_param
from llmrelay.api.frames import CallPiece, Delta
from llmrelay.api.pipeline import (
    Frames,
    GenerationServing,
    Streamed,
    finish_reason,
    openai_usage,
    usage_of,
)
from llmrelay.api.plan import Caller, Plan
from llmrelay.api.protocol import sampling_of
from llmrelay.protocol import new_call_id

ROLE, END = RoleDelta(), EndDelta()  # the same in every answer


def message(final: Delta) -> ChatMessageOut:
    """The assistant's message of a whole answer: its text, and the tools it called (then a
    text of nothing at all is null, as OpenAI answers)."""
    calls = [ToolCallOut(c.id or new_call_id(), FunctionCallOut(c.name, c.arguments))
             for c in final.tool_calls]
    text, thought = final.text, final.reasoning
    if thought:  # a reasoning model's reasoning, apart (reasoning_content and reasoning)
        if not calls:
            return ChatMessageReasoned(content=text, reasoning_content=thought, reasoning=thought)
        return ChatMessageReasonedWithCalls(content=text or None, reasoning_content=thought,
                                            reasoning=thought, tool_calls=calls)
    if not calls:
        return ChatMessageOut(content=text)
    return ChatMessageWithCalls(content=text or None, tool_calls=calls)


def call_delta(d: CallPiece) -> ToolCallDelta | FirstToolCallDelta:
    """A worker's piece of a call as a chunk's: the first (it has the id) names the call."""
    if d.id:
        return FirstToolCallDelta(index=d.index, id=d.id, function=NamedArgumentsDelta(
            name=d.name, arguments=d.arguments))
    return ToolCallDelta(index=d.index, function=ArgumentsDelta(d.arguments))


def _one_prompt(i: int) -> int:
    return 0  # every choice of a chat request has the same prompt


def to_plan(body: ChatCompletionRequest, request_id: str, caller: Caller | None) -> Plan:
    """A chat request as the pipeline's plan (400s for what it cannot be)."""
    messages = normalize_messages(body.messages)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_param("top_logprobs", "top_logprobs requires logprobs to be true.")
    return Plan(model=body.model, request_id=request_id, sampling=sampling_of(
        body, max_new_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None),
        messages=messages, n=body.n or 1, constraints=body.constraints(), caller=caller,
        reasoning=body.reasoning_settings())


class ChatServing(GenerationServing):
    async def create(self, body: ChatCompletionRequest, request_id: str,
                     receive: Receive, caller: Caller | None = None) -> ChatCompletion | Streamed:
        """The answer to one request of `caller` (None: a server without API keys): whole, or
        `Streamed` (see pipeline.respond)."""
        plan = await self.admit(body, lambda: to_plan(body, request_id, caller))
        n = plan.n
        id_, created, logprobs = f"chatcmpl-{request_id}", int(self.clock()), bool(body.logprobs)

        if not body.stream:
            finals = await self.pipeline.answer_all(receive, plan)
            return self.response(id_, created, body.model, finals, logprobs)

        opening = self.pipeline.opening(receive, plan)
        await opening.wait_briefly()
        include_usage = body.include_usage
        return Streamed(lambda: self.chunks(id_, created, body.model, n, opening.frames(),
                                            logprobs, include_usage), opening)

    @staticmethod
    def response(id_: str, created: int, model: str, finals: list[Delta],
                 logprobs: bool) -> ChatCompletion:
        """A whole answer from each choice's whole Delta."""
        return ChatCompletion(id=id_, created=created, model=model, choices=[ChatChoice(
            index=i,
            message=message(f),
            logprobs=ChatLogprobs(f.logprobs or []) if logprobs else None,
            finish_reason=finish_reason(f.finish_reason),
        ) for i, f in enumerate(finals)], usage=openai_usage(usage_of(dict(enumerate(finals)),
                                                                      _one_prompt)))

    @staticmethod
    async def chunks(id_: str, created: int, model: str, n: int, frames: AsyncIterator[Frames],
                     logprobs: bool, include_usage: bool
                     ) -> AsyncIterator[list[ChatCompletionChunk]]:
        """Chunks from the choices' merged delta frames, a list per batch of frames."""

        last: dict[int, Delta] = {}
        # The role chunks go out with the first frames.
        out = [ChatCompletionChunk(id=id_, created=created, model=model,
                                   choices=[ChunkChoice(index=i, delta=ROLE)]) for i in range(n)]
        async for batch in frames:
            for i, f in batch:
                last[i] = f
                if f.reasoning:
                    out.append(ChatCompletionChunk(id=id_, created=created, model=model, choices=[
                        ChunkChoice(index=i, delta=ReasoningDelta(f.reasoning, f.reasoning))]))
                lp = f.logprobs
                if f.text or lp is not None:
                    out.append(ChatCompletionChunk(id=id_, created=created, model=model, choices=[
                        ChunkChoice(index=i, delta=ContentDelta(f.text),
                                    logprobs=ChatLogprobs(lp)
                                    if logprobs and lp is not None else None)]))
                if f.tool_calls:
                    out.append(ChatCompletionChunk(id=id_, created=created, model=model, choices=[
                        ChunkChoice(index=i, delta=ToolCallsDelta([
                            call_delta(d) for d in f.tool_calls]))]))
                if f.finish_reason:
                    out.append(ChatCompletionChunk(id=id_, created=created, model=model, choices=[
                        ChunkChoice(index=i, delta=END,
                                    finish_reason=finish_reason(f.finish_reason))]))
            yield out
            out = []
        usage = usage_of(last, _one_prompt)  # charged to the API key even when not sent
        if include_usage:
            out.append(ChatCompletionUsageChunk(id=id_, created=created, model=model, choices=[],
                                                usage=openai_usage(usage)))
        yield out
