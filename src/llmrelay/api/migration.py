"""A generation that survives its worker: mid-stream failover by continuation, and whole
answers joined from frames.

`MigratingStream` wraps a started generation. When its worker dies, its connection breaks, or
it fails mid-answer, the generation moves to another worker of the model: the same request,
plus the ids of the tokens received so far (`generated_token_ids`, our `continuation`
extension). The new worker generates those tokens again, sends nothing for them, and goes on
(worker/engines/threaded.py): the reader sees one unbroken answer, with no text twice or
missing, and `usage` counting the whole answer once. At temperature 0 on our engines it is
byte-identical to an undisturbed answer. At most `max_migrations` moves per generation, only
to workers that speak the extension (and honour what the request asks); a generation on a worker
that does not (FastChat's, an upstream server's: no token ids) ends with an error as before.

`join` makes a whole answer (one delta frame) from a generation's frames, so non-streamed
requests use the same streams and move the same way instead of starting over.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiohttp

from llmrelay.api.frames import CallPiece, Delta
from llmrelay.api.observe import note_migration
from llmrelay.protocol import EXT_CONTINUATION, ErrorCode, LogprobEntry, text_offsets

log = logging.getLogger("llmrelay.api")


class Stream(Protocol):
    worker: Any

    def batches(self) -> AsyncIterator[list[Delta]]: ...

    async def aclose(self) -> None: ...


# Opens the same generation elsewhere: (params, workers to avoid) -> a started stream.
Reopen = Callable[[dict[str, Any], set[str]], Awaitable[Stream]]


class WorkerLost(Exception):
    """The worker went away mid-answer (the reason, for the log and the metrics)."""


def resumable(worker: Any) -> bool:
    return EXT_CONTINUATION in worker.extensions


class MigratingStream:
    """A streamed generation that moves to another worker when its own fails (module doc)."""

    def __init__(self, first: Stream, params: dict[str, Any], reopen: Reopen,
                 max_migrations: int) -> None:
        self.stream = first
        self.worker = first.worker
        self.params = params
        self.reopen = reopen
        self.max_migrations = max_migrations
        self.migrations = 0
        self.tried = {first.worker.name}
        self.token_ids: list[int] = []  # every token received, in order
        self.finished = False

    async def batches(self) -> AsyncIterator[list[Delta]]:
        while True:
            try:
                async for batch in self.stream.batches():
                    out = self._take(batch)
                    if out:
                        yield out
                    if self.finished:
                        return
                if not self._may_move():  # the pipeline answers this as a broken stream
                    raise aiohttp.ClientPayloadError("the worker closed the stream before the "
                                                     "answer ended")
                await self._move(WorkerLost("the stream ended before the answer did"))
            except WorkerLost as e:
                await self._move(e)
            except (aiohttp.ClientError, ValueError) as e:
                if not self._may_move():
                    raise
                await self._move(e)

    def _take(self, batch: list[Delta]) -> list[Delta]:
        """The frames to pass on; an error frame of a broken worker raises WorkerLost."""
        out = []
        for f in batch:
            code = f.error_code
            if code >= ErrorCode.INTERNAL_ERROR and self._may_move():
                raise WorkerLost(f"the worker failed mid-answer ({f.text[:200]})")
            if code:
                out.append(f)
                self.finished = True
                break
            self.token_ids += f.token_ids
            out.append(f)
            if f.finish_reason:
                self.finished = True
                break
        return out

    def _may_move(self) -> bool:
        return (self.migrations < self.max_migrations and resumable(self.worker)
                and not self.finished)

    async def _move(self, why: Exception) -> None:
        """Open the generation on another worker, resuming after the tokens received."""
        old = self.worker
        reason = "worker failed" if isinstance(why, WorkerLost) else "connection lost"
        await self.stream.aclose()
        params = {**self.params, "generated_token_ids": list(self.token_ids)}
        self.stream = await self.reopen(params, set(self.tried))
        self.worker = self.stream.worker
        self.tried.add(self.worker.name)
        self.migrations += 1
        note_migration(reason, old.name, self.worker.name)
        log.warning("generation %s moved from worker %s to %s after %d tokens (%s: %s)",
                    self.params.get("request_id"), old.name, self.worker.name,
                    len(self.token_ids), reason, why)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def join(stream: Stream) -> Delta:
    """A whole answer as one Delta from a generation's frames: its text and reasoning, logprob
    entries with each one's offset in the text, tool calls joined by index, the last usage,
    finish reason and stop string; an error frame as it is."""
    text: list[str] = []
    reasoning: list[str] = []
    length = 0
    entries: list[LogprobEntry] = []
    offsets: list[int] = []
    calls: list[CallPiece] = []
    last = Delta()
    try:
        async for batch in stream.batches():
            for f in batch:
                if f.error_code:
                    return f
                if f.logprobs:
                    offsets += text_offsets(f.logprobs, length)
                    entries += f.logprobs
                text.append(f.text)
                length += len(f.text)
                reasoning.append(f.reasoning)
                for piece in f.tool_calls:
                    add_call_piece(calls, piece)
                last = f
    finally:
        await stream.aclose()
    return Delta(text="".join(text), reasoning="".join(reasoning), tool_calls=calls,
                 logprobs=entries or None, text_offset=offsets if entries else None,
                 usage=last.usage, finish_reason=last.finish_reason,
                 stop_sequence=last.stop_sequence)


def add_call_piece(calls: list[CallPiece], piece: CallPiece) -> None:
    """Join a tool call's piece (from a delta frame) into whole calls, by its index."""
    while len(calls) <= piece.index:
        calls.append(CallPiece(len(calls)))
    call = calls[piece.index]
    call.id = piece.id or call.id
    call.name = piece.name or call.name
    call.arguments += piece.arguments
