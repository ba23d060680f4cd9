"""What chat and completions share: n generations opened before answering, merged frames,
SSE framing, mid-stream errors as OpenAI error events, whole answers for non-streamed requests,
and cancelling on client disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from fastapi import Request

from llmrelay.api.errors import APIError, from_worker
from llmrelay.api.observe import note_cancelled, note_first_token, note_usage
from llmrelay.api.routing import ParamsFor, WorkerStream, WorkerTable, generate_once, open_stream
from llmrelay.protocol import dumps
from llmrelay.runtime import ClientGone, WorkTimedOut, client_gone, until_gone

log = logging.getLogger("llmrelay.api")

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def open_all(table: WorkerTable, model: str, params: list[dict[str, Any] | ParamsFor],
                   keys: list[str] | None = None) -> list[WorkerStream]:
    """Start every generation (one per choice) before answering; all or nothing.

    `keys`: the conversation's prefix keys, for the `prefix` dispatch method."""
    if len(params) == 1:
        return [await open_stream(table, model, params[0], keys)]
    results = await asyncio.gather(*(open_stream(table, model, p, keys) for p in params),
                                   return_exceptions=True)
    streams = [r for r in results if isinstance(r, WorkerStream)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for s in streams:
            await s.aclose()
        raise errors[0]
    return streams


async def answer_all(request: Request, table: WorkerTable, model: str,
                     params: list[dict[str, Any] | ParamsFor],
                     keys: list[str] | None = None) -> list[dict[str, Any]]:
    """A non-streamed request's answers, one whole delta frame per choice, all generated at
    once; all or nothing. Cancelled (which stops the workers) when the client leaves; 504 past
    the server's request timeout."""
    timeout = float(getattr(request.app.state, "request_timeout", 600.0))

    async def all_answers() -> list[dict[str, Any]]:
        if len(params) == 1:
            return [await generate_once(table, model, params[0], keys)]
        tasks = [asyncio.ensure_future(generate_once(table, model, p, keys)) for p in params]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:  # one failed: the others stop
                t.cancel()

    try:
        finals = await until_disconnect(request, all_answers(), timeout)
    except APIError as e:
        if e.status == 499:
            note_cancelled()
        raise
    for f in finals:
        if f.get("text"):
            note_first_token()  # the first text this server saw: the whole answer
            break
    note_usage(sum(int((f.get("usage") or {}).get("prompt_tokens") or 0) for f in finals),
               sum(int((f.get("usage") or {}).get("completion_tokens") or 0) for f in finals))
    return finals


Frames = list[tuple[int, dict[str, Any]]]


async def merged(streams: list[WorkerStream], deadline: float | None = None
                 ) -> AsyncIterator[Frames]:
    """Frames of all streams as they come, tagged with the stream's index, in batches: all
    that are ready at once (so a streamed answer writes them to the client in one go).

    A worker error frame, a broken connection mid-stream, or passing `deadline` (event-loop
    time) raises APIError, after the frames that came before it; the streams are closed either
    way, which stops the workers.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(i: int, s: WorkerStream) -> None:
        try:
            async for batch in s.batches():
                queue.put_nowait((i, batch))
        except (aiohttp.ClientError, ValueError) as e:
            queue.put_nowait((i, APIError(
                502, f"The model worker stopped answering mid-generation ({type(e).__name__}).",
                type="server_error")))
        finally:
            queue.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    usage: dict[int, dict[str, Any]] = {}  # each stream's last usage, for the metrics
    # The deadline is one timer that drops a marker in the queue (a wait_for per frame cost a
    # timer and a task per frame).
    late = object()
    timer = (asyncio.get_running_loop().call_at(deadline, queue.put_nowait, (-1, late))
             if deadline is not None else None)
    try:
        while remaining:
            ready = [await queue.get()]
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
                        if f.get("error_code"):
                            error = from_worker(int(f["error_code"]), str(f.get("text", "")))
                            break
                        if f.get("text"):
                            note_first_token()
                        if f.get("usage"):
                            usage[i] = f["usage"]
                        out.append((i, f))
                if error is not None:
                    break
            if out:
                yield out
            if error is not None:
                raise error
    except (asyncio.CancelledError, GeneratorExit):
        note_cancelled()  # the client went away (or the answer was abandoned)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        note_usage(sum(int(u.get("prompt_tokens") or 0) for u in usage.values()),
                   sum(int(u.get("completion_tokens") or 0) for u in usage.values()))
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()


async def until_disconnect(request: Request, work: Awaitable[T],
                           timeout: float | None = None) -> T:
    """Await `work`, cancelling it if the client goes away (so the worker stops generating):
    499; or after `timeout` seconds: 504."""
    try:
        return await until_gone(request.receive, work, timeout)
    except ClientGone:
        raise APIError(499, "The client closed the request.") from None
    except WorkTimedOut:
        raise timeout_error() from None


async def sse_stream(body: Callable[[], AsyncIterator[list[dict[str, Any]]]],
                     opening: Opening | None = None) -> AsyncIterator[bytes]:
    """Serialize chunks as SSE, each list of chunks in one write; a failure mid-stream becomes
    an error event, then [DONE].

    With an `opening` still waiting for busy workers, SSE comments keep the connection alive
    (so a proxy's read timeout does not cut it) until the generations start.
    """
    try:
        if opening is not None:
            async for comment in opening.keepalives():
                yield comment
        async for chunks in body():
            if chunks:
                yield b"".join(sse(c) for c in chunks)
    except APIError as e:
        log.warning("stream ended with an error: %s", e.message)
        yield sse(e.body())
    except Exception:
        log.exception("stream failed")
        yield sse(APIError(500, "The server had an error while streaming.", "server_error").body())
    finally:
        if opening is not None:
            await opening.close_if_unused()
    yield SSE_DONE


def timeout_error() -> APIError:
    return APIError(504, "The request took longer than the server's request timeout.",
                    type="server_error", code="timeout")


class Opening:
    """The streamed generations being opened for one request, one per choice.

    The request waits briefly for them (`wait_briefly`): if the workers answer in time, errors
    can still be proper HTTP errors; otherwise the response starts and `keepalives` covers the
    wait.
    """

    def __init__(self, request: Request, work: Awaitable[list[WorkerStream]]) -> None:
        state = request.app.state
        loop = asyncio.get_running_loop()
        self.request = request
        self.keepalive = float(getattr(state, "sse_keepalive", 10.0))
        self.deadline = loop.time() + float(getattr(state, "request_timeout", 600.0))
        self.task: asyncio.Future[list[WorkerStream]] = asyncio.ensure_future(work)
        self.used = False

    @property
    def streams(self) -> list[WorkerStream]:
        self.used = True
        return self.task.result()

    def remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    async def wait_briefly(self) -> None:
        """Wait up to one keep-alive period; raises what opening raised if it failed by then.
        A client that leaves meanwhile (a long prompt's prefill) stops the workers at once."""
        if not self.task.done():
            watcher = asyncio.ensure_future(client_gone(self.request.receive))
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


def usage_of(last: dict[int, dict[str, Any]], prompt_of: Callable[[int], int]) -> dict[str, int]:
    """Usage over all choices: each distinct prompt counted once, completions summed."""
    prompts: dict[int, int] = {}
    completion = 0
    for i, f in last.items():
        u = f.get("usage") or {}
        prompts[prompt_of(i)] = int(u.get("prompt_tokens", 0))
        completion += int(u.get("completion_tokens", 0))
    prompt = sum(prompts.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
