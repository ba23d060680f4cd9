"""The API server's HTTP to workers: generations (streamed or whole) and embeddings, each
through one failover loop that picks a worker from the table, counts the request in flight
there while it is open, and moves on to another worker when one fails before answering.

Two clients, both owned here: aiohttp for what requests are made of (generation streams, whole
answers, embeddings: about a third of httpx's CPU per request on this hop, as httpx's pool
polls every idle connection's socket on each request), and a pooled httpx client for side
questions (FastChat workers' templates and token counts, asked by the FastChat adapter).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import httpx

from llmrelay.api.errors import APIError
from llmrelay.api.fastchat import CumulativeToDelta, FastChatAdapter, WorkerUnsuitable
from llmrelay.api.frames import Delta
from llmrelay.api.migration import MigratingStream, join, resumable
from llmrelay.api.observe import note_failover
from llmrelay.api.plan import Caller
from llmrelay.api.table import Accept, Worker, WorkerTable
from llmrelay.protocol import EXT_FAIRNESS, ErrorCode, dumps, iter_frame_batches, loads

log = logging.getLogger("llmrelay.api")

JSON_TYPE = {"Content-Type": "application/json"}
KEEPALIVE = 4.0  # seconds an idle connection to a worker is kept (uvicorn's own: 5 s)
T = TypeVar("T")
# One try on one worker: (worker, body, exit stack) -> (its first frame, what the caller gets).
Attempt = Callable[[Worker, dict[str, Any], contextlib.AsyncExitStack],
                   Awaitable[tuple[Delta, T]]]
# The body for the worker picked (ours and FastChat's take different ones).
BodyFor = Callable[[Worker], Awaitable[dict[str, Any]]]

# Failures that say the worker is not there at all: out of rotation until its next heartbeat.
REFUSED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, httpx.ConnectError,
           httpx.ConnectTimeout)
# Failures of this worker before it answered: another may do better.
FAILED = (aiohttp.ClientError, httpx.HTTPError, StopAsyncIteration, ValueError)


class WorkerStream:
    """One generation on one worker: the first frame is read before anyone answers the client.

    Frames come in batches (those that arrived from the worker together), each frame parsed
    once into a `Delta` here."""

    def __init__(self, worker: Worker, stack: contextlib.AsyncExitStack,
                 batches: AsyncIterator[list[dict[str, Any]]], first: list[dict[str, Any]],
                 cumulative: bool = False) -> None:
        self.worker = worker
        self._stack = stack
        self._batches = batches
        # A worker answering FastChat's cumulative frames: turned into deltas here.
        self._convert = CumulativeToDelta() if cumulative else None
        self.first = self._parsed(first)

    def _parsed(self, batch: list[dict[str, Any]]) -> list[Delta]:
        if self._convert is not None:
            return [Delta.of(self._convert(f)) for f in batch]
        return [Delta.of(f) for f in batch]

    async def batches(self) -> AsyncIterator[list[Delta]]:
        yield self.first
        async for batch in self._batches:
            yield self._parsed(batch)

    async def aclose(self) -> None:
        await self._stack.aclose()


def _answer(raw: bytes) -> dict[str, Any]:
    """A worker's JSON answer; an HTTP error page from something in between as an error frame."""
    try:
        data = loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"text": raw.decode(errors="replace")[:500],
                "error_code": int(ErrorCode.INTERNAL_ERROR)}
    return data


class WorkerTransport:
    """Requests to workers, with failover and in-flight counting, for every endpoint."""

    def __init__(self, table: WorkerTable, client: httpx.AsyncClient,
                 fastchat: FastChatAdapter | None = None,
                 headers: dict[str, str] | None = None, max_migrations: int = 2) -> None:
        self.table = table
        self.max_migrations = max_migrations  # moves of a started generation (migration.py)
        self.client = client  # side questions; closed with the transport
        self.fastchat = fastchat or FastChatAdapter(client)
        self.headers = headers or {}
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session, made on first use (in the running loop).

        An idle connection is dropped after KEEPALIVE seconds, before the worker's uvicorn
        drops it (5 s): with aiohttp's default of 15 s a request could take a connection the
        worker was closing at that moment and fail ("Can not write request body"), which the
        failover loop counts as a failed worker (a 503 when it is the model's only one)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=None, connect=3.0, sock_read=600.0),
                connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=KEEPALIVE),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.client.aclose()

    async def _post(self, stack: contextlib.AsyncExitStack, url: str, body: dict[str, Any]
                    ) -> aiohttp.ClientResponse:
        response = await stack.enter_async_context(self.session().post(
            url, data=dumps(body), headers=JSON_TYPE))
        # Unread (the client left, or cancelled mid-answer): drop the connection, which stops
        # the worker.
        stack.callback(response.close)
        return response

    def _generation(self, params: dict[str, Any], caller: Caller | None) -> BodyFor:
        """The generation's body for the worker picked. A worker that announces fair sharing
        also gets the caller's API key name and priority class, which order its queue; other
        workers get nothing new."""

        async def body_for(worker: Worker) -> dict[str, Any]:
            body = await self.fastchat.body_for(worker, params)
            if caller is not None and EXT_FAIRNESS in worker.extensions:
                body = {**body, "key": caller.name, "priority": caller.priority}
            return body
        return body_for

    # ---- the three requests ------------------------------------------------------------------

    async def open_stream(self, model: str, params: dict[str, Any],
                          keys: list[str] | None = None, accept: Accept | None = None,
                          caller: Caller | None = None) -> WorkerStream | MigratingStream:
        """Start a streamed generation (POST /worker_generate_stream) on a worker; it has sent
        its first frame when this returns. `params`: what our workers take (plan.Plan's
        `worker_params`; FastChat's workers get them translated). `keys`: the conversation's
        prefix keys, for `prefix` dispatch; `accept`: which workers can take the request
        (tools.Constraints.honoured_by); `caller`: who asks, for the workers' fair queues. On
        a worker that can be resumed, the generation moves to another if its worker fails
        mid-answer (migration.py)."""
        stream = await self._open(model, params, keys, accept, caller)
        if self.max_migrations <= 0 or not resumable(stream.worker):
            return stream

        def resumes(w: Worker) -> bool:
            return resumable(w) and (accept is None or accept(w))

        async def reopen(again: dict[str, Any], avoid: set[str]) -> WorkerStream:
            return await self._open(model, again, None, resumes, caller, avoid)

        return MigratingStream(stream, params, reopen, self.max_migrations)

    async def _open(self, model: str, params: dict[str, Any], keys: list[str] | None,
                    accept: Accept | None, caller: Caller | None,
                    exclude: set[str] | None = None) -> WorkerStream:
        async def start(worker: Worker, body: dict[str, Any], stack: contextlib.AsyncExitStack
                        ) -> tuple[Delta, WorkerStream]:
            response = await self._post(stack, worker.name + "/worker_generate_stream", body)
            batches = iter_frame_batches(response.content.iter_any())
            stream = WorkerStream(worker, stack, batches, await batches.__anext__(),
                                  cumulative=not body.get("delta"))
            return stream.first[0], stream

        return await self._on_a_worker(model, self._generation(params, caller), start,
                                       keep_open=True, keys=keys, accept=accept,
                                       exclude=exclude)

    async def generate_once(self, model: str, params: dict[str, Any],
                            keys: list[str] | None = None, accept: Accept | None = None,
                            caller: Caller | None = None) -> Delta:
        """A whole generation as one Delta: its text, calls and logprobs cover the whole answer.

        Read as a stream of frames and joined here (migration.join), so a worker that fails
        mid-answer hands the rest to another (continuation) instead of the answer starting over.
        With `--max-migrations 0`: one request to POST /worker_generate and one JSON body (our
        workers join their delta frames when asked for `delta`; FastChat's answer with their
        last cumulative frame, turned into a delta from nothing here)."""
        if self.max_migrations > 0:
            return await join(await self.open_stream(model, params, keys, accept, caller))

        async def once(worker: Worker, body: dict[str, Any], stack: contextlib.AsyncExitStack
                       ) -> tuple[Delta, Delta]:
            response = await self._post(stack, worker.name + "/worker_generate", body)
            data = _answer(await response.read())
            final = Delta.of(data if body.get("delta") else CumulativeToDelta()(data))
            return final, final

        return await self._on_a_worker(model, self._generation(params, caller), once,
                                       keep_open=False, keys=keys, accept=accept)

    async def embed(self, model: str, body: dict[str, Any],
                    accept: Accept | None = None) -> dict[str, Any]:
        """Embeddings (POST /worker_get_embeddings) from a worker `accept` takes:
        `{"embedding": [...], "token_num": n}`."""

        async def once(worker: Worker, body: dict[str, Any], stack: contextlib.AsyncExitStack
                       ) -> tuple[Delta, dict[str, Any]]:
            response = await self._post(stack, worker.name + "/worker_get_embeddings", body)
            data = _answer(await response.read())
            if not data.get("error_code") and not isinstance(data.get("embedding"), list):
                data = {"text": "the answer holds no embeddings",
                        "error_code": int(ErrorCode.INTERNAL_ERROR)}
            return Delta.of(data), data

        async def same(worker: Worker) -> dict[str, Any]:
            return body

        return await self._on_a_worker(model, same, once, keep_open=False, accept=accept)

    async def ask(self, model: str, path: str, body_for: BodyFor,
                  accept: Accept | None = None) -> dict[str, Any]:
        """A small question to a worker of `model` that `accept` takes (POST `path`, one JSON
        answer: token counts, token ids), with failover like a generation. `body_for` builds the
        body for the worker picked (FastChat's workers may need another)."""

        async def once(worker: Worker, body: dict[str, Any], stack: contextlib.AsyncExitStack
                       ) -> tuple[Delta, dict[str, Any]]:
            response = await self._post(stack, worker.name + path, body)
            data = _answer(await response.read())
            if response.status >= 400 and not data.get("error_code"):  # e.g. no such endpoint
                data = {"text": f"{path} answered HTTP {response.status}",
                        "error_code": int(ErrorCode.INTERNAL_ERROR)}
            return Delta.of(data), data

        return await self._on_a_worker(model, body_for, once, keep_open=False, accept=accept)

    # ---- failover ----------------------------------------------------------------------------

    async def _on_a_worker(self, model: str, body_for: BodyFor, attempt: Attempt[T],
                           keep_open: bool, keys: list[str] | None = None,
                           accept: Accept | None = None, exclude: set[str] | None = None) -> T:
        """Pick a worker and run `attempt` on it; on failure before its first frame, try
        another.

        `body_for` builds the request body for the worker picked (it may raise WorkerUnsuitable
        to move on to another). `keep_open`: the attempt's result owns the exit stack (a stream
        still being read); otherwise it is closed on return, which ends the request's count in
        flight.

        Every worker of the model is tried at most once. Workers that are full (or shutting
        down) are skipped; when all of them are, the answer is 429 with Retry-After.
        """
        table = self.table
        tried: set[str] = set(exclude or ())
        last_error = ""
        unsuitable = ""
        full = 0
        while True:
            worker = table.pick(model, exclude=tried, keys=keys, accept=accept)
            if worker is None:
                break
            tried.add(worker.name)
            table.acquire(worker.name)
            stack = contextlib.AsyncExitStack()
            stack.callback(table.release, worker.name)
            try:
                body = await body_for(worker)
                first, result = await attempt(worker, body, stack)
            except REFUSED as e:
                await stack.aclose()
                table.mark_down(worker)
                last_error = f"{worker.name}: {type(e).__name__}"
                note_failover()
                continue
            except WorkerUnsuitable as e:
                await stack.aclose()
                unsuitable = str(e)
                continue
            except APIError:
                await stack.aclose()
                raise
            except FAILED as e:
                await stack.aclose()
                last_error = f"{worker.name}: {type(e).__name__} {e}"
                log.warning("worker %s failed before answering (%s); trying another",
                            worker.name, last_error)
                note_failover()
                continue
            except BaseException:  # cancelled (the client left) before the first frame
                await stack.aclose()
                raise
            code = first.error_code
            if code or not keep_open:
                await stack.aclose()
            if code:
                if code == ErrorCode.ENGINE_OVERLOADED:
                    full += 1
                    last_error = f"{worker.name}: {first.text or 'full'}"
                    note_failover()
                    continue
                if code >= ErrorCode.INTERNAL_ERROR:  # the worker broke: another may not
                    last_error = f"{worker.name}: {first.text}"
                    log.warning("worker %s failed before answering (%s); trying another",
                                worker.name, last_error)
                    note_failover()
                    continue
                raise first.error()
            table.remember(keys, worker.name)
            return result
        if full and full == len(tried):
            raise APIError(429, f"Every worker serving '{model}' is busy; retry shortly.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}, overloaded=True)
        if unsuitable and not last_error and not full:
            raise APIError(400, f"No worker of '{model}' can serve this request: {unsuitable}.")
        if last_error:
            raise APIError(503, f"All workers for '{model}' failed ({last_error}). Try again.",
                           type="server_error", headers={"Retry-After": "1"})
        raise APIError(503, f"No worker for '{model}' is available right now.",
                       type="server_error", headers={"Retry-After": "2"})
