"""Anthropic's Messages API over the shared pipeline: a request -> its Plan (`to_plan`: chat
messages and constraints from protocol.py, Anthropic's sampling fields; no OpenAI request in
between) -> the workers' typed frames shaped into a Message, or into Anthropic's event stream;
and token counts asked of a worker of the model.

Stop reasons: a worker's `tool_calls` is `tool_use`, `length` is `max_tokens`, `stop` is
`stop_sequence` when the worker names the stop string that ended it (our workers' last frame
says `stop_sequence`; llama.cpp and transformers engines always know it, the openai engine when
its upstream says it, as vLLM does), else `end_turn` (an end token, or a worker that cannot
tell: FastChat's).

`MessagesServing.create` and `.count_tokens` are the endpoints with plain arguments;
`message` and `events` shape frames alone, so tests can feed them frames without a server.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from llmrelay.api.errors import APIError
from llmrelay.api.frames import CallPiece, Delta, TokenUsage
from llmrelay.api.messages.errors import ANTHROPIC_SSE
from llmrelay.api.messages.protocol import (
    BlockDelta,
    BlockStart,
    BlockStop,
    CountTokensRequest,
    DeltaUsage,
    Event,
    InputJSONDelta,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    Ping,
    StopDelta,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    TokenCount,
    ToolUseBlock,
    Usage,
)
from llmrelay.api.pipeline import Frames, GenerationServing, Pipeline, Streamed, usage_of
from llmrelay.api.plan import Caller, Plan, Sampling
from llmrelay.api.table import Worker, WorkerTable
from llmrelay.api.tools import Constraints
from llmrelay.api.transport import WorkerTransport
from llmrelay.protocol import EXT_TOKENIZE

log = logging.getLogger("llmrelay.api")

PING, STOP = Ping(), MessageStop()


def tool_use_id(worker_id: str | None) -> str:
    """Anthropic's `toolu_` id for a worker's call id (ids are opaque: a later tool_result
    names it, and it goes back to the worker as it is)."""
    if not worker_id:
        return f"toolu_{uuid.uuid4().hex[:24]}"
    return worker_id if worker_id.startswith("toolu_") else "toolu_" + worker_id.removeprefix(
        "call_")


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the `input` object; {} when they are not one (cut short by
    max_tokens)."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        log.info("tool call arguments are not JSON (cut short?): %.80s", arguments)
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(frame: Delta, stops: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a worker's last frame (see the module docstring)."""
    reason = frame.finish_reason
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    said = frame.stop_sequence
    if said is not None and said in stops:
        return "stop_sequence", said
    return "end_turn", None


def usage(u: TokenUsage | None) -> Usage:
    u = u or TokenUsage()
    return Usage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens)


def billed(last: Delta) -> TokenUsage:
    """The answer's usage (the pipeline's count, which is also what the request is charged)."""
    return usage_of({0: last}, lambda i: 0)


class Blocks:
    """The content blocks of a streamed answer, opened and closed as frames come: the events
    for text pieces and tool call pieces, a ping after the first block starts."""

    def __init__(self) -> None:
        self.count = 0  # blocks started
        self.call: int | None = None  # the worker's index of the open tool call block
        self.open: str | None = None  # the open block's type
        self.pinged = False

    def _start(self, block: ThinkingBlock | TextBlock | ToolUseBlock) -> list[Event]:
        out = self.close()
        out.append(BlockStart(index=self.count, content_block=block))
        self.count += 1
        self.open = block.type
        if not self.pinged:
            out.append(PING)
            self.pinged = True
        return out

    def close(self) -> list[Event]:
        if self.open is None:
            return []
        self.open, self.call = None, None
        return [BlockStop(index=self.count - 1)]

    def thinking(self, text: str) -> list[Event]:
        out = [] if self.open == "thinking" else self._start(ThinkingBlock(thinking=""))
        out.append(BlockDelta(index=self.count - 1, delta=ThinkingDelta(thinking=text)))
        return out

    def text(self, text: str) -> list[Event]:
        out = [] if self.open == "text" else self._start(TextBlock(text=""))
        out.append(BlockDelta(index=self.count - 1, delta=TextDelta(text=text)))
        return out

    def tool(self, piece: CallPiece) -> list[Event]:
        """A piece of a call: the first ({index, id, name}) starts its block, the others add
        to its arguments (our workers send a call's pieces together, one call after another)."""
        out: list[Event] = []
        if not (self.open == "tool_use" and self.call == piece.index):
            out = self._start(ToolUseBlock(id=tool_use_id(piece.id), name=piece.name, input={}))
            self.call = piece.index
        if piece.arguments:
            out.append(BlockDelta(index=self.count - 1,
                                  delta=InputJSONDelta(partial_json=piece.arguments)))
        return out

    def end(self) -> list[Event]:
        out = self.close()
        if not self.pinged:
            out.append(PING)
            self.pinged = True
        return out


def to_plan(body: CountTokensRequest | MessagesRequest, request_id: str,
            caller: Caller | None) -> Plan:
    """A Messages request (or a token count's) as the pipeline's plan; top_k 0 is off."""
    constraints = body.constraints()
    messages = body.chat_messages()
    sampling = Sampling()
    if isinstance(body, MessagesRequest):
        sampling = Sampling.of(temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k or None, stop=body.stop_sequences,
                               max_new_tokens=body.max_tokens)
    return Plan(model=body.model, request_id=request_id, sampling=sampling, messages=messages,
                constraints=constraints, caller=caller, reasoning=body.reasoning_settings())


class MessagesServing(GenerationServing):
    """`/v1/messages` and `/v1/messages/count_tokens`; `transport` answers token counts."""

    def __init__(self, table: WorkerTable, pipeline: Pipeline,
                 transport: WorkerTransport) -> None:
        super().__init__(table, pipeline)
        self.transport = transport

    async def create(self, body: MessagesRequest, request_id: str, receive: Receive,
                     caller: Caller | None = None) -> Message | Streamed:
        """The answer to one request of `caller` (None: a server without API keys): a
        Message, or `Streamed` events (pipeline.respond)."""
        plan = await self.admit(body, lambda: to_plan(body, request_id, caller))
        id_, stops = f"msg_{request_id}", list(body.stop_sequences or [])
        if not body.stream:
            finals = await self.pipeline.answer_all(receive, plan)
            return self.message(id_, body.model, finals[0], stops)
        opening = self.pipeline.opening(receive, plan)
        await opening.wait_briefly()
        return Streamed(lambda: self.events(id_, body.model, opening.frames(), stops), opening,
                        ANTHROPIC_SSE)

    @staticmethod
    def message(id_: str, model: str, final: Delta, stops: list[str]) -> Message:
        """A whole answer from the worker's whole Delta."""
        content: list[ThinkingBlock | TextBlock | ToolUseBlock] = []
        if final.reasoning:
            content.append(ThinkingBlock(thinking=final.reasoning))
        if final.text:
            content.append(TextBlock(text=final.text))
        for c in final.tool_calls:
            content.append(ToolUseBlock(id=tool_use_id(c.id), name=c.name,
                                        input=tool_input(c.arguments)))
        reason, sequence = stop_reason(final, stops)
        return Message(id=id_, model=model, content=content, stop_reason=reason,
                       stop_sequence=sequence, usage=usage(billed(final)))

    @staticmethod
    async def events(id_: str, model: str, frames: AsyncIterator[Frames], stops: list[str]
                     ) -> AsyncIterator[list[Event]]:
        """Anthropic's events from the merged delta frames, a list per batch of frames:
        message_start, then per block content_block_start (a ping after the first),
        content_block_delta..., content_block_stop; then message_delta (why it stopped, the
        usage) and message_stop."""
        blocks = Blocks()
        last: Delta | None = None
        async for batch in frames:
            out: list[Event] = []
            for _, f in batch:
                if last is None:
                    out.append(MessageStart(message=Message(
                        id=id_, model=model, content=[], stop_reason=None, stop_sequence=None,
                        usage=usage(f.usage))))
                last = f
                if f.reasoning:
                    out += blocks.thinking(f.reasoning)
                if f.text:
                    out += blocks.text(f.text)
                for piece in f.tool_calls:
                    out += blocks.tool(piece)
            yield out
        out = blocks.end()
        last = last or Delta()
        reason, sequence = stop_reason(last, stops)
        u = billed(last)
        out.append(MessageDelta(delta=StopDelta(stop_reason=reason, stop_sequence=sequence),
                                usage=DeltaUsage(input_tokens=u.prompt_tokens,
                                                 output_tokens=u.completion_tokens)))
        out.append(STOP)
        yield out

    async def count_tokens(self, body: CountTokensRequest) -> TokenCount:
        """The prompt's tokens (messages, system, tools), counted by a worker of the model as
        it renders them for a generation (FastChat's workers: with their conversation
        template, no tools)."""
        plan = await self.admit(body, lambda: to_plan(body, "", None))
        constraints, messages = plan.constraints, plan.messages or []
        counting = Constraints(tools=constraints.tools, tool_choice=constraints.tool_choice,
                               named=constraints.named, parallel=constraints.parallel)
        ours: dict[str, Any] = {"model": body.model, "prompt": messages, **counting.params()}
        fastchat = self.transport.fastchat

        async def body_for(worker: Worker) -> dict[str, Any]:
            if worker.speaks_ours:
                return ours
            return {"model": body.model,
                    "prompt": await fastchat.rendered(worker, body.model, messages)}

        def tools_counted(worker: Worker) -> bool:  # the tools are in the prompt
            return EXT_TOKENIZE in worker.extensions and counting.honoured_by(worker)

        data = await self.transport.ask(body.model, "/count_token", body_for,
                                        tools_counted if counting.calls_tools else None)
        count = data.get("count")
        if not isinstance(count, int):
            raise APIError(502, "The model worker's token count came without a count.",
                           type="server_error")
        return TokenCount(input_tokens=count)
