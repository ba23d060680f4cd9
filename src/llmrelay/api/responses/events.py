"""A streamed Response: the workers' delta frames -> OpenAI's event sequence, each event with
the next `sequence_number`, and SSE with `event:` lines (no `[DONE]`).

The order is the one the `openai` SDK's stream state checks (`client.responses.stream(...)`):
`response.created`, `response.in_progress`; per output item `response.output_item.added`, for a
message `response.content_part.added`, `response.output_text.delta`..., `.done`,
`response.content_part.done`, for a call `response.function_call_arguments.delta`..., `.done`,
for a reasoning model's reasoning (an item of its own, first) `response.reasoning_text.delta`...,
`.done`;
then `response.output_item.done`; at the end `response.completed`, `response.incomplete`
(the length limit) or `response.failed` (an error mid-generation), carrying the whole Response.
Every item added is done before the end; items keep their ids from added to done.

`EventWriter` is plain Python: tests feed it frames without a server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from llmrelay.api.errors import APIError
from llmrelay.api.frames import CallPiece, Delta
from llmrelay.api.pipeline import Frames, usage_of
from llmrelay.api.responses.protocol import (
    FunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponseError,
    ResponseUsage,
    error_code,
    new_id,
)
from llmrelay.protocol import dumps, new_call_id

# ---- the events -------------------------------------------------------------------------------


@dataclass
class LifecycleEvent:  # response.created / in_progress / completed / incomplete / failed
    type: str
    sequence_number: int
    response: Response


@dataclass
class ItemEvent:  # response.output_item.added / done
    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


@dataclass
class PartEvent:  # response.content_part.added / done
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


@dataclass
class TextDelta:
    sequence_number: int
    item_id: str
    output_index: int
    delta: str
    content_index: int = 0
    logprobs: list[Any] = field(default_factory=list)
    type: str = "response.output_text.delta"


@dataclass
class TextDone:
    sequence_number: int
    item_id: str
    output_index: int
    text: str
    content_index: int = 0
    logprobs: list[Any] = field(default_factory=list)
    type: str = "response.output_text.done"


@dataclass
class ArgumentsDelta:
    sequence_number: int
    item_id: str
    output_index: int
    delta: str
    type: str = "response.function_call_arguments.delta"


@dataclass
class ArgumentsDone:
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str
    type: str = "response.function_call_arguments.done"


@dataclass
class ReasoningDelta:
    sequence_number: int
    item_id: str
    output_index: int
    delta: str
    content_index: int = 0
    type: str = "response.reasoning_text.delta"


@dataclass
class ReasoningDone:
    sequence_number: int
    item_id: str
    output_index: int
    text: str
    content_index: int = 0
    type: str = "response.reasoning_text.done"


Event = LifecycleEvent | ItemEvent | PartEvent | TextDelta | TextDone | ArgumentsDelta \
    | ArgumentsDone | ReasoningDelta | ReasoningDone


def encode(event: Event) -> bytes:
    """An event as SSE, with its `event:` line."""
    return b"event: " + event.type.encode() + b"\ndata: " + dumps(event) + b"\n\n"


# ---- the writer -----------------------------------------------------------------------------------


def usage(last: Delta | None) -> ResponseUsage:
    """The Response usage from the last frame (through the pipeline's usage count, which is
    also what the request is charged)."""
    u = usage_of({0: last} if last else {}, lambda i: 0)
    return ResponseUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                         total_tokens=u.total_tokens, output_tokens_details=OutputTokensDetails(
                             reasoning_tokens=u.reasoning_tokens))


def finish(response: Response, output: list[OutputItem], last: Delta | None,
           now: Callable[[], float] = time.time) -> Response:
    """`response` ended: completed, or incomplete when the length limit cut it."""
    cut = last is not None and last.finish_reason == "length"
    return replace(response, output=output, usage=usage(last),
                   status="incomplete" if cut else "completed",
                   incomplete_details={"reason": "max_output_tokens"} if cut else None,
                   completed_at=None if cut else int(now()))


class EventWriter:
    """The events of one streamed Response, from its frames (one generation: index 0)."""

    def __init__(self, response: Response, now: Callable[[], float] = time.time) -> None:
        self.response = response
        self.now = now
        self.seq = -1
        self.items: list[OutputItem] = []
        self.open: OutputItem | None = None  # the item being written
        self.text: list[str] = []  # the open message's (or reasoning's) pieces
        self.calls: dict[int, FunctionCall] = {}  # a frame's call index -> its item
        self.last: Delta | None = None
        self.final: Response | None = None

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _lifecycle(self, kind: str, response: Response) -> LifecycleEvent:
        return LifecycleEvent(f"response.{kind}", self._next(), response)

    def start(self) -> list[Event]:
        return [self._lifecycle("created", self.response),
                self._lifecycle("in_progress", self.response)]

    def feed(self, frames: Frames) -> list[Event]:
        out: list[Event] = []
        for _, f in frames:
            if f.reasoning:
                out += self._reasoning(f.reasoning)
            if f.text:
                out += self._text(f.text)
            for d in f.tool_calls:
                out += self._call_piece(d)
            if f.usage is not None or f.finish_reason:
                self.last = f
        return out

    def _add(self, item: OutputItem) -> list[Event]:
        self.items.append(item)
        self.open = item
        index = len(self.items) - 1
        return [ItemEvent("response.output_item.added", self._next(), index, replace(item))]

    def _message(self) -> tuple[OutputMessage, list[Event]]:
        """The message being written: the open one, or a new one (closing a call)."""
        if isinstance(self.open, OutputMessage):
            return self.open, []
        out = self._close()
        msg = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        out += self._add(msg)
        out.append(PartEvent("response.content_part.added", self._next(), msg.id,
                             len(self.items) - 1, 0, OutputText("")))
        return msg, out

    def _text(self, piece: str) -> list[Event]:
        msg, out = self._message()
        self.text.append(piece)
        out.append(TextDelta(self._next(), msg.id, len(self.items) - 1, piece))
        return out

    def _reasoning(self, piece: str) -> list[Event]:
        """A piece of reasoning: into the open reasoning item, or a new one."""
        out: list[Event] = []
        if not isinstance(self.open, ReasoningItem):
            out += self._close()
            out += self._add(ReasoningItem(id=new_id("rs"), status="in_progress"))
        assert isinstance(self.open, ReasoningItem)
        self.text.append(piece)
        out.append(ReasoningDelta(self._next(), self.open.id, len(self.items) - 1, piece))
        return out

    def _call_piece(self, d: CallPiece) -> list[Event]:
        out: list[Event] = []
        call = self.calls.get(d.index)
        if call is None:
            out += self._close()
            call = FunctionCall(id=new_id("fc"), call_id=d.id or new_call_id(),
                                name=d.name, arguments="", status="in_progress")
            self.calls[d.index] = call
            out += self._add(call)
        if d.arguments:
            call.arguments += d.arguments
            out.append(ArgumentsDelta(self._next(), call.id, self.items.index(call),
                                      d.arguments))
        return out

    def _close(self, status: str = "completed") -> list[Event]:
        """The open item is done."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.items.index(item)
        out: list[Event] = []
        if isinstance(item, OutputMessage):
            part = OutputText("".join(self.text))
            self.text = []
            item.content = [part]
            out += [TextDone(self._next(), item.id, index, part.text),
                    PartEvent("response.content_part.done", self._next(), item.id, index, 0,
                              part)]
        elif isinstance(item, ReasoningItem):
            thought = ReasoningText("".join(self.text))
            self.text = []
            item.content = [thought]
            out.append(ReasoningDone(self._next(), item.id, index, thought.text))
        else:
            out.append(ArgumentsDone(self._next(), item.id, index, item.name, item.arguments))
        item.status = status
        out.append(ItemEvent("response.output_item.done", self._next(), index, item))
        return out

    def finish(self) -> list[Event]:
        """The last events of a generation that ended: completed, or incomplete."""
        cut = self.last is not None and self.last.finish_reason == "length"
        out = self._close("incomplete" if cut else "completed")
        if not any(not isinstance(i, ReasoningItem) for i in self.items):
            # said nothing, called nothing: an empty message, as when whole
            out += self._message()[1] + self._close()
        self.final = finish(self.response, self.items, self.last, self.now)
        return out + [self._lifecycle(self.final.status, self.final)]

    def fail(self, e: APIError) -> list[Event]:
        """The last events of a generation that failed: response.failed with the reason."""
        out = self._close("incomplete")
        self.final = replace(self.response, status="failed", output=self.items,
                             error=ResponseError(error_code(e), e.message),
                             usage=usage(self.last) if self.last else None)
        return out + [self._lifecycle("failed", self.final)]
