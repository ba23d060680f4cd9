"""The generation pipeline every front door shares: admission (`GenerationServing.admit`: the
request's refusals, its model, the workers that can honour its constraints, once for every
door), a request's `Plan` (plan.py) opened as one generation per prompt and choice before
answering (all or nothing), their typed frames (frames.Delta) merged as they come, SSE framing
with keep-alives while busy workers are awaited, mid-stream errors as error events, whole
answers for non-streamed requests, usage and what the API key is charged (`usage_of`), and
cancelling the workers when the client disconnects or the request runs past its time. Each
door keeps its own renderer (chunks, events, response objects) and its own error shape.

Driven with plain arguments (the transport, the limits, the ASGI `receive` that tells of a
disconnect), so the front doors' serving classes can be tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import aiohttp
from starlette.responses import Response
from starlette.types import Receive

from llmrelay.api.errors import APIError
from llmrelay.api.frames import Delta, TokenUsage
from llmrelay.api.images import ImageFetcher, refs
from llmrelay.api.observe import (
    note_billed,
    note_cancelled,
    note_complete,
    note_first_token,
    note_model,
    note_usage,
    settle,
)
from llmrelay.api.plan import Caller, Plan
from llmrelay.api.protocol import ReasonedUsageInfo, UsageInfo
from llmrelay.api.table import Accept, WorkerTable
from llmrelay.dispatch import conversation_keys
from llmrelay.protocol import dumps
from llmrelay.runtime import (
    ClientGone,
    ClosingStreamingResponse,
    FastJSONResponse,
    WorkTimedOut,
    client_gone,
    until_gone,
)

log = logging.getLogger("llmrelay.api")

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
NO_USAGE = TokenUsage()
# Frames that come within this many seconds of a streamed answer's last write go out together
# in the next write, at most this much later (as Nagle's algorithm, by time; sooner when a
# stream ends): a burst of frames (a worker that fell behind, a replay after failover) costs two
# writes, not one per frame, while a model's tokens, milliseconds apart, are each written the
# moment they come.
GATHER_S = 0.001


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def finish_reason(reason: str | None) -> str:
    """OpenAI's reasons: a worker's anything else ends as `stop`."""
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def usage_of(last: dict[int, Delta], prompt_of: Callable[[int], int]) -> TokenUsage:
    """Usage over all choices (their last frames): each distinct prompt counted once,
    completions (and the reasoning within them) summed. This is what the request's API key is
    charged (observe.note_billed), so front doors compute it for every answer, shown to the
    client or not."""
    prompts: dict[int, int] = {}
    completion = reasoning = 0
    for i, f in last.items():
        u = f.usage or NO_USAGE
        prompts[prompt_of(i)] = u.prompt_tokens
        completion += u.completion_tokens
        reasoning += u.reasoning_tokens
    prompt = sum(prompts.values())
    note_billed(prompt, completion)
    return TokenUsage(prompt, completion, reasoning)


def openai_usage(u: TokenUsage) -> UsageInfo:
    """Chat's and completions' `usage` object; an answer that reasoned says how many of its
    completion tokens were reasoning (`completion_tokens_details.reasoning_tokens`)."""
    if u.reasoning_tokens:
        return ReasonedUsageInfo(prompt_tokens=u.prompt_tokens,
                                 completion_tokens=u.completion_tokens,
                                 total_tokens=u.total_tokens, completion_tokens_details={
                                     "reasoning_tokens": u.reasoning_tokens})
    return UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     total_tokens=u.total_tokens)


# ---- generations on workers ---------------------------------------------------------------------


class Stream(Protocol):
    """One open generation (transport.WorkerStream)."""

    def batches(self) -> AsyncIterator[list[Delta]]: ...

    async def aclose(self) -> None: ...


class Generations(Protocol):
    """What the pipeline needs of the transport (transport.WorkerTransport)."""

    async def open_stream(self, model: str, params: dict[str, Any],
                          keys: list[str] | None = None, accept: Accept | None = None,
                          caller: Caller | None = None) -> Any: ...

    async def generate_once(self, model: str, params: dict[str, Any],
                            keys: list[str] | None = None, accept: Accept | None = None,
                            caller: Caller | None = None) -> Delta: ...


@dataclass
class Limits:
    request_timeout: float = 600.0  # seconds for a whole request
    sse_keepalive: float = 10.0  # seconds between SSE comments while workers are awaited


class Pipeline:
    """Opens a request's generations on workers through the transport, within the limits."""

    def __init__(self, transport: Generations, limits: Limits | None = None,
                 images: ImageFetcher | None = None) -> None:
        self.transport = transport
        self.limits = limits or Limits()
        self.images = images or ImageFetcher()  # fetches and checks a request's images

    async def open_all(self, plan: Plan) -> list[Stream]:
        """Start every generation of the plan (one per prompt and choice) before answering;
        all or nothing."""
        t = self.transport
        if plan.choices == 1:
            return [await t.open_stream(plan.model, plan.worker_params(0), plan.prefix_keys,
                                        plan.accept, plan.caller)]
        results = await asyncio.gather(
            *(t.open_stream(plan.model, plan.worker_params(i), plan.prefix_keys, plan.accept,
                            plan.caller) for i in range(plan.choices)),
            return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        streams = [r for r in results if not isinstance(r, BaseException)]
        if errors:
            for s in streams:
                await s.aclose()
            raise errors[0]
        return streams

    def opening(self, receive: Receive, plan: Plan) -> Opening:
        """The streamed generations of a request, being opened."""
        return Opening(receive, self.open_all(plan), self.limits)

    async def answer_all(self, receive: Receive, plan: Plan) -> list[Delta]:
        """A non-streamed request's answers, one whole Delta per generation, all generated at
        once; all or nothing. Cancelled (which stops the workers) when the client leaves; 504
        past the request timeout."""
        t = self.transport

        async def all_answers() -> list[Delta]:
            if plan.choices == 1:
                return [await t.generate_once(plan.model, plan.worker_params(0),
                                              plan.prefix_keys, plan.accept, plan.caller)]
            tasks = [asyncio.ensure_future(t.generate_once(
                plan.model, plan.worker_params(i), plan.prefix_keys, plan.accept, plan.caller))
                for i in range(plan.choices)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:  # one failed: the others stop
                    task.cancel()

        try:
            finals = await until_disconnect(receive, all_answers(), self.limits.request_timeout)
        except APIError as e:
            if e.status == 499:
                note_cancelled()
            raise
        if any(f.text or f.reasoning for f in finals):
            note_first_token()  # the first text this server saw: the whole answer
        usages = [f.usage or NO_USAGE for f in finals]
        note_usage(sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages))
        return finals


Frames = list[tuple[int, Delta]]


async def merged(streams: list[Stream], deadline: float | None = None
                 ) -> AsyncIterator[Frames]:
    """Frames of all streams as they come, tagged with the stream's index, in batches: all
    that are ready at once (so a streamed answer writes them to the client in one go).

    A worker error frame, a broken connection mid-stream, or passing `deadline` (event-loop
    time) raises APIError, after the frames that came before it; the streams are closed either
    way, which stops the workers.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    gathering: asyncio.Future[None] | None = None  # while a burst is gathered (below)

    def stop_gathering() -> None:
        if gathering is not None and not gathering.done():
            gathering.set_result(None)

    async def pump(i: int, s: Stream) -> None:
        try:
            async for batch in s.batches():
                queue.put_nowait((i, batch))
        except (aiohttp.ClientError, ValueError) as e:
            queue.put_nowait((i, APIError(
                502, f"The model worker stopped answering mid-generation ({type(e).__name__}).",
                type="server_error")))
        finally:
            queue.put_nowait((i, end))
            stop_gathering()  # nothing more comes from this stream: no reason to wait for it

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    usage: dict[int, TokenUsage] = {}  # each stream's last usage, for the metrics
    # The deadline is one timer that drops a marker in the queue (a wait_for per frame cost a
    # timer and a task per frame).
    late = object()
    loop = asyncio.get_running_loop()
    timer = loop.call_at(deadline, queue.put_nowait, (-1, late)) if deadline is not None else None
    written = float("-inf")  # event-loop time of the last write
    try:
        while remaining:
            ready = [await queue.get()]
            wait = written + GATHER_S - loop.time()
            if wait > 0 and ready[0][1] is not end:
                # close on the heels of the last write: the rest of the burst joins it, until
                # GATHER_S after that write or until a stream ends
                gathering = loop.create_future()
                timer_of_gathering = loop.call_later(wait, stop_gathering)
                try:
                    await gathering
                finally:
                    timer_of_gathering.cancel()
                    gathering = None
            while not queue.empty():
                ready.append(queue.get_nowait())
            out: Frames = []
            error: APIError | None = None
            for i, item in ready:
                if item is late:
                    error = timeout_error()
                elif item is end:
                    remaining -= 1
                elif isinstance(item, APIError):
                    error = item
                else:
                    for f in item:
                        if f.error_code:
                            error = f.error()
                            break
                        if f.text or f.reasoning:
                            note_first_token()
                        if f.usage is not None:
                            usage[i] = f.usage
                        out.append((i, f))
                if error is not None:
                    break
            if out:
                yield out
                written = loop.time()
            if error is not None:
                raise error
        note_complete()  # what the answer sends from here on waits for its accounting
    except (asyncio.CancelledError, GeneratorExit):
        note_cancelled()  # the client went away (or the answer was abandoned)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        note_usage(sum(u.prompt_tokens for u in usage.values()),
                   sum(u.completion_tokens for u in usage.values()))
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()


async def until_disconnect(receive: Receive, work: Awaitable[T],
                           timeout: float | None = None) -> T:
    """Await `work`, cancelling it if the client goes away (so the worker stops generating):
    499; or after `timeout` seconds: 504."""
    try:
        return await until_gone(receive, work, timeout)
    except ClientGone:
        raise APIError(499, "The client closed the request.") from None
    except WorkTimedOut:
        raise timeout_error() from None


def timeout_error() -> APIError:
    return APIError(504, "The request took longer than the server's request timeout.",
                    type="server_error", code="timeout")


class Opening:
    """The streamed generations being opened for one request, one per choice.

    The request waits briefly for them (`wait_briefly`): if the workers answer in time, errors
    can still be proper HTTP errors; otherwise the response starts and `keepalives` covers the
    wait.
    """

    def __init__(self, receive: Receive, work: Awaitable[list[Stream]], limits: Limits) -> None:
        self.receive = receive
        self.keepalive = limits.sse_keepalive
        self.deadline = asyncio.get_running_loop().time() + limits.request_timeout
        self.task: asyncio.Future[list[Stream]] = asyncio.ensure_future(work)
        self.used = False

    @property
    def streams(self) -> list[Stream]:
        self.used = True
        return self.task.result()

    def frames(self) -> AsyncIterator[Frames]:
        """The opened streams' frames, merged (see `merged`), until the request's deadline.
        Only once they are open (after `keepalives`)."""
        return merged(self.streams, self.deadline)

    def remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    async def wait_briefly(self) -> None:
        """Wait up to one keep-alive period; raises what opening raised if it failed by then.
        A client that leaves meanwhile (a long prompt's prefill) stops the workers at once."""
        if not self.task.done():
            watcher = asyncio.ensure_future(client_gone(self.receive))
            try:
                await asyncio.wait({self.task, watcher}, return_when=asyncio.FIRST_COMPLETED,
                                   timeout=min(self.keepalive, self.remaining()))
                if watcher.done() and not watcher.cancelled():
                    raise APIError(499, "The client closed the request.")
            except BaseException:
                await self.close_if_unused()
                raise
            finally:
                watcher.cancel()
        if self.task.done():
            self.task.result()

    async def keepalives(self) -> AsyncIterator[bytes]:
        while not self.task.done():
            timeout = min(self.keepalive, self.remaining())
            if timeout <= 0:
                self.task.cancel()
                raise timeout_error()
            await asyncio.wait({self.task}, timeout=timeout)
            if not self.task.done():
                yield b": keep-alive\n\n"
        self.task.result()

    async def close_if_unused(self) -> None:
        """The client left (or we failed) before using the streams: stop the workers."""
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            return
        if not self.used and not self.task.cancelled() and self.task.exception() is None:
            self.used = True  # closed here, once
            for s in self.task.result():
                await s.aclose()


# ---- answering ----------------------------------------------------------------------------------


class Admissible(Protocol):
    """What admission asks of a front door's request."""

    model: str

    def refuse_unsupported(self) -> None: ...


class GenerationServing:
    """What every front door's serving class shares: the table (for the model's checks), the
    pipeline, a clock for `created`, and admission."""

    def __init__(self, table: WorkerTable, pipeline: Pipeline,
                 clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.pipeline = pipeline
        self.clock = clock

    async def admit(self, body: Admissible, to_plan: Callable[[], Plan | Awaitable[Plan]]
                    ) -> Plan:
        """The request's plan, once it may run: 400 for fields this server cannot honour;
        404/503 for a model nobody serves; then the door's `to_plan` (its own 400s); then a
        400 naming the parameter when no worker of the model can honour the constraints. With
        `prefix` dispatch the plan gets its conversation's prefix keys.

        Images in the messages are fetched and checked first (a bad one is a 400 naming its
        part, api/images.py), then the model must be one that reads images."""
        body.refuse_unsupported()
        self.table.check_model(body.model)
        note_model(body.model)
        made = to_plan()
        plan = await made if inspect.isawaitable(made) else made
        if plan.messages is not None and self.pipeline.images.count(plan.messages):
            plan.constraints.images = next(refs(plan.messages))["param"]
            plan = replace(plan, messages=await self.pipeline.images.resolve(plan.messages))
        plan.constraints.check_workers(self.table, plan.model)
        if self.table.dispatch_method == "prefix" and plan.messages is not None:
            plan = replace(plan, prefix_keys=conversation_keys(plan.messages))
        return plan


@dataclass(frozen=True)
class SSEFormat:
    """How a front door writes its event stream: each chunk, an error mid-stream, the end."""

    chunk: Callable[[Any], bytes] = sse
    error: Callable[[APIError], bytes] = lambda e: sse(e.body())
    done: bytes = SSE_DONE


OPENAI_SSE = SSEFormat()  # `data:` lines, errors as OpenAI's error objects, then [DONE]


class StreamEnds(Protocol):
    """A stream with events of its own around its chunks (the Responses API's lifecycle): the
    events that open it, before any keep-alive, and those a failure ends it with (instead of
    the format's error event; awaited, so that what they report can be stored first)."""

    def start(self) -> list[Any]: ...

    async def failed(self, e: APIError) -> list[Any]: ...


async def sse_stream(chunks: Callable[[], AsyncIterator[list[Any]]],
                     opening: Opening | None = None,
                     fmt: SSEFormat = OPENAI_SSE,
                     ends: StreamEnds | None = None) -> AsyncIterator[bytes]:
    """Serialize chunks as SSE, each list of chunks in one write; a failure mid-stream becomes
    an error event (or `ends.failed`), then the end (`fmt`: OpenAI's by default). `chunks` is
    called once the opening's streams are open.

    With an `opening` still waiting for busy workers, SSE comments keep the connection alive
    (so a proxy's read timeout does not cut it) until the generations start.
    """

    def write(batch: list[Any]) -> bytes:
        return b"".join(fmt.chunk(c) for c in batch)

    async def failure(e: APIError) -> bytes:
        return fmt.error(e) if ends is None else write(await ends.failed(e))

    try:
        if ends is not None:
            yield write(ends.start())
        if opening is not None:
            async for comment in opening.keepalives():
                yield comment
        # closed at once when the client leaves (which stops the workers), not by the GC
        async with contextlib.aclosing(chunks()) as batches:
            async for batch in batches:
                if batch:
                    await settle()  # the answer's last events leave after its usage is stored
                    yield write(batch)
    except APIError as e:
        log.warning("stream ended with an error: %s", e.message)
        yield await failure(e)
    except Exception:
        log.exception("stream failed")
        yield await failure(APIError(500, "The server had an error while streaming.",
                                     "server_error"))
    finally:
        if opening is not None:
            await opening.close_if_unused()
    if fmt.done:
        await settle()
        yield fmt.done


@dataclass
class Streamed:
    """A streamed answer: its chunks (made once the generations are open), the opening to
    close if they are never read, and how its front door writes them."""

    chunks: Callable[[], AsyncIterator[list[Any]]]
    opening: Opening
    fmt: SSEFormat = OPENAI_SSE
    ends: StreamEnds | None = None

    def body(self) -> AsyncIterator[bytes]:
        """The SSE bytes in `fmt` (chat's and completions' `data:` lines, then [DONE], by
        default; `ends`: events of the stream's own around its chunks)."""
        return sse_stream(self.chunks, self.opening, self.fmt, self.ends)


def respond(answer: Any) -> Response:
    """The HTTP response for what a serving class answered: a response dataclass as JSON, or
    a `Streamed` answer as SSE."""
    if isinstance(answer, Streamed):
        return ClosingStreamingResponse(answer.body(),
                                        media_type="text/event-stream", headers=SSE_HEADERS,
                                        cleanup=answer.opening.close_if_unused)
    return FastJSONResponse(answer)
