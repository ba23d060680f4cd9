"""The API server's copy of the worker table, worker picking, and streams from workers.

The table is read from the controller in the background (`/worker_table`), so a request never
waits on the controller; when the controller is down the last table keeps serving. Picking
uses the controller's dispatch method plus what this server knows that the table does not yet:
its own requests in flight, and workers that just refused a connection (taken out of rotation
until their next heartbeat). A worker that fails before its first frame (for a non-streamed
answer: before its answer) is retried on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import httpx

from llmrelay.api.errors import APIError, from_worker
from llmrelay.api.fastchat_workers import CumulativeToDelta, FastChatInfo, WorkerUnsuitable
from llmrelay.api.observe import note_failover, note_model
from llmrelay.dispatch import Affinity, pick
from llmrelay.protocol import ErrorCode, dumps, iter_frame_batches, loads, worker_extensions

log = logging.getLogger("llmrelay.api")

JSON_TYPE = {"Content-Type": "application/json"}


@dataclass
class Worker:
    name: str
    model_names: list[str]
    speed: float
    queue_length: int
    last_heart_beat: float
    registered_at: float
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def extensions(self) -> set[str]:
        return worker_extensions(self.status)


class WorkerTable:
    """What the API server knows about workers; refreshed from the controller(s)."""

    def __init__(self, controllers: list[str], client: httpx.AsyncClient,
                 refresh: float = 1.0, headers: dict[str, str] | None = None) -> None:
        self.controllers = [c.rstrip("/") for c in controllers]
        self.client = client  # the controller, and workers' side questions (templates, ...)
        self.headers = headers or {}
        self._streams: aiohttp.ClientSession | None = None
        self.refresh = refresh
        self.workers: dict[str, Worker] = {}
        self.dispatch_method = "shortest_queue"
        self.loaded = False  # whether any table was ever received
        self.controller_ok = False
        self.inflight: dict[str, int] = {}
        self.down: dict[str, float] = {}  # worker -> its last heartbeat when it failed us
        self.affinity = Affinity()  # conversation prefix -> worker, for the `prefix` method
        self._task: asyncio.Task[None] | None = None
        self.fastchat_info = FastChatInfo()  # templates of FastChat workers (fastchat_workers.py)

    # -- refreshing ---------------------------------------------------------------------------
    def apply(self, table: dict[str, Any]) -> None:
        workers = {}
        for w in table.get("workers", []):
            workers[w["name"]] = Worker(
                name=w["name"], model_names=list(w.get("model_names", [])),
                speed=float(w.get("speed", 1)),
                # The reported queue includes our own requests in flight, which `pick` adds
                # exactly; keep only the load from elsewhere.
                queue_length=max(0, int(w.get("queue_length", 0))
                                 - self.inflight.get(w["name"], 0)),
                last_heart_beat=float(w.get("last_heart_beat", 0)),
                registered_at=float(w.get("registered_at", 0)),
                status=dict(w.get("status") or {}),
            )
        if table.get("warming_up"):
            # A controller that just (re)started has not heard every worker yet: keep the ones
            # we knew until it has been up for a whole expiration period.
            for name, w in self.workers.items():
                workers.setdefault(name, w)
        for name, beat in list(self.down.items()):
            w = workers.get(name)
            if w is None or w.last_heart_beat > beat:
                del self.down[name]  # gone from the table, or alive again by its heartbeat
        self.workers = workers
        self.dispatch_method = table.get("dispatch_method", self.dispatch_method)
        self.loaded = True

    async def fetch_once(self) -> bool:
        for c in self.controllers:
            try:
                r = await self.client.get(c + "/worker_table", timeout=2.0)
                r.raise_for_status()
                self.apply(r.json())
                if not self.controller_ok:
                    log.info("reading the worker table from controller %s (%d workers)",
                             c, len(self.workers))
                self.controller_ok = True
                return True
            except (httpx.HTTPError, ValueError, KeyError) as e:
                last_error = e
        if self.controller_ok or not self.loaded:
            log.warning(
                "controller %s not reachable (%s); serving from the last worker table "
                "(%d workers), retrying every %.1f s",
                ", ".join(self.controllers), type(last_error).__name__, len(self.workers),
                self.refresh,
            )
        self.controller_ok = False
        return False

    async def run(self) -> None:
        while True:
            await self.fetch_once()
            await asyncio.sleep(self.refresh)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._streams is not None:
            await self._streams.close()
            self._streams = None

    def streams(self) -> aiohttp.ClientSession:
        """The HTTP client of the generation streams to workers: aiohttp, which took about a
        third of httpx's CPU per request on this hop (httpx's pool polls every idle
        connection's socket on each request); made on first use, in the running loop."""
        if self._streams is None:
            self._streams = aiohttp.ClientSession(
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=None, connect=3.0, sock_read=600.0),
                connector=aiohttp.TCPConnector(limit=1000),
            )
        return self._streams

    # -- questions ------------------------------------------------------------------------------
    def models(self) -> dict[str, float]:
        """Served model names -> when first registered."""
        out: dict[str, float] = {}
        for w in self.workers.values():
            for m in w.model_names:
                out[m] = min(out.get(m, w.registered_at), w.registered_at)
        return out

    def check_model(self, model: str) -> None:
        """404 for a model nobody serves (with the closest name); 503 if we know no workers."""
        if any(model in w.model_names for w in self.workers.values()):
            note_model(model)
            return
        names = sorted(self.models())
        if not names:
            why = "" if self.controller_ok else (
                f" The controller at {', '.join(self.controllers)} is not reachable.")
            raise APIError(503, f"No model workers are available right now.{why}",
                           type="server_error", headers={"Retry-After": "2"})
        close = difflib.get_close_matches(model.lower(), [n.lower() for n in names], n=1,
                                          cutoff=0.4)
        hint = ""
        if close:
            hint = f" Did you mean '{next(n for n in names if n.lower() == close[0])}'?"
        raise APIError(
            404,
            f"The model '{model[:100]}' does not exist. This server serves: "
            f"{', '.join(names)}.{hint}",
            param="model", code="model_not_found",
        )

    def pick(self, model: str, exclude: set[str] = frozenset(),
             keys: list[str] | None = None) -> Worker | None:
        """`keys`: the conversation's prefix keys (`dispatch.conversation_keys`), for `prefix`."""
        candidates = [w for w in self.workers.values()
                      if model in w.model_names and w.name not in exclude
                      and w.name not in self.down
                      # a worker whose upstream server is down says so (engines/openai.py)
                      and (w.status.get("llmrelay") or {}).get("ready", True) is not False]
        preferred = self.affinity.lookup(keys) if keys else None
        return pick(self.dispatch_method, candidates, extra_load=self.inflight,  # type: ignore[return-value]
                    preferred=preferred)

    def mark_down(self, worker: Worker) -> None:
        self.down[worker.name] = worker.last_heart_beat
        log.warning("worker %s refused the connection; out of rotation until its next heartbeat",
                    worker.name)


class WorkerStream:
    """One generation on one worker: the first frame is read before anyone answers the client.

    Frames come in batches: those that arrived from the worker together."""

    def __init__(self, table: WorkerTable, worker: Worker, stack: contextlib.AsyncExitStack,
                 batches: AsyncIterator[list[dict[str, Any]]], first: list[dict[str, Any]],
                 cumulative: bool = False) -> None:
        self.table = table
        self.worker = worker
        self._stack = stack
        self._batches = batches
        # A worker answering FastChat's cumulative frames: turned into deltas here.
        self._convert = CumulativeToDelta() if cumulative else None
        self._first = self._converted(first)

    def _converted(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._convert(f) for f in batch] if self._convert else batch

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        yield self._first
        async for batch in self._batches:
            yield self._converted(batch)

    async def aclose(self) -> None:
        await self._stack.aclose()


# The params for a generation, given the worker picked (ours and FastChat's take different ones).
ParamsFor = Callable[[Worker], Awaitable[dict[str, Any]]]
T = TypeVar("T")
# One try on one worker: (worker, body, exit stack) -> (the first frame, what the caller gets).
Attempt = Callable[[Worker, dict[str, Any], contextlib.AsyncExitStack],
                   Awaitable[tuple[dict[str, Any], T]]]


async def open_stream(table: WorkerTable, model: str,
                      params: dict[str, Any] | ParamsFor,
                      keys: list[str] | None = None) -> WorkerStream:
    """Start a streamed generation (POST /worker_generate_stream) on a worker; it has sent its
    first frame when this returns."""

    async def start(worker: Worker, body: dict[str, Any], stack: contextlib.AsyncExitStack
                    ) -> tuple[dict[str, Any], WorkerStream]:
        response = await stack.enter_async_context(table.streams().post(
            worker.name + "/worker_generate_stream", data=dumps(body), headers=JSON_TYPE))
        stack.callback(response.close)  # unread (client gone): drop the connection too
        batches = iter_frame_batches(response.content.iter_any())
        first_batch = await batches.__anext__()
        return first_batch[0], WorkerStream(table, worker, stack, batches, first_batch,
                                            cumulative=not body.get("delta"))

    return await on_a_worker(table, model, params, keys, start, keep_open=True)


async def generate_once(table: WorkerTable, model: str,
                        params: dict[str, Any] | ParamsFor,
                        keys: list[str] | None = None) -> dict[str, Any]:
    """A whole generation in one answer (POST /worker_generate), as one delta frame: `text` and
    `logprobs` cover the whole answer. One request and one JSON body instead of a frame stream
    read frame by frame: all a non-streamed answer needs, for less of this server's time.

    Our workers join their delta frames when asked for `delta`; FastChat's answer with their
    last cumulative frame, turned into a delta from nothing here."""

    async def once(worker: Worker, body: dict[str, Any], stack: contextlib.AsyncExitStack
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
        response = await stack.enter_async_context(table.streams().post(
            worker.name + "/worker_generate", data=dumps(body), headers=JSON_TYPE))
        stack.callback(response.close)  # cancelled mid-answer: drop the connection, which stops it
        raw = await response.read()
        try:
            final = loads(raw)
        except ValueError:
            final = None
        if not isinstance(final, dict):  # an HTTP error page from something in between
            final = {"text": raw.decode(errors="replace")[:500],
                     "error_code": int(ErrorCode.INTERNAL_ERROR)}
        if not body.get("delta"):
            final = CumulativeToDelta()(final)
        return final, final

    return await on_a_worker(table, model, params, keys, once, keep_open=False)


async def on_a_worker(table: WorkerTable, model: str, params: dict[str, Any] | ParamsFor,
                      keys: list[str] | None, attempt: Attempt[T], keep_open: bool) -> T:
    """Pick a worker and run `attempt` on it; on failure before its first frame, try another.

    `params` is the request body, or a function of the picked worker that builds it (it may
    raise WorkerUnsuitable to move on to another worker). `keep_open`: the attempt's result
    owns the exit stack (a stream still being read); otherwise it is closed on return.

    Every worker of the model is tried at most once. Workers that are full (or shutting down)
    are skipped; when all of them are, the answer is 429 with Retry-After.
    """
    tried: set[str] = set()
    last_error = ""
    unsuitable = ""
    full = 0
    while True:
        worker = table.pick(model, exclude=tried, keys=keys)
        if worker is None:
            break
        tried.add(worker.name)
        table.inflight[worker.name] = table.inflight.get(worker.name, 0) + 1
        stack = contextlib.AsyncExitStack()
        stack.callback(_release, table, worker.name)
        try:
            body = params if isinstance(params, dict) else await params(worker)
            first, result = await attempt(worker, body, stack)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
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
        except (aiohttp.ClientError, httpx.HTTPError, StopAsyncIteration, ValueError) as e:
            await stack.aclose()
            last_error = f"{worker.name}: {type(e).__name__} {e}"
            log.warning("worker %s failed before answering (%s); trying another",
                        worker.name, last_error)
            note_failover()
            continue
        except BaseException:  # cancelled (the client left) before the first frame
            await stack.aclose()
            raise
        code = int(first.get("error_code") or 0)
        if code or not keep_open:
            await stack.aclose()
        if code:
            if code == ErrorCode.ENGINE_OVERLOADED:
                full += 1
                last_error = f"{worker.name}: {first.get('text', 'full')}"
                note_failover()
                continue
            if code >= 50000:  # the worker broke before answering: another may not
                last_error = f"{worker.name}: {first.get('text', '')}"
                log.warning("worker %s failed before answering (%s); trying another",
                            worker.name, last_error)
                note_failover()
                continue
            raise from_worker(code, str(first.get("text", "")))
        if keys:
            table.affinity.remember(keys, worker.name)
        return result
    if full and full == len(tried):
        raise APIError(429, f"Every worker serving '{model}' is busy; retry shortly.",
                       type="rate_limit_exceeded", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"})
    if unsuitable and not last_error and not full:
        raise APIError(400, f"No worker of '{model}' can serve this request: {unsuitable}.")
    if last_error:
        raise APIError(503, f"All workers for '{model}' failed ({last_error}). Try again.",
                       type="server_error", headers={"Retry-After": "1"})
    raise APIError(503, f"No worker for '{model}' is available right now.",
                   type="server_error", headers={"Retry-After": "2"})


def _release(table: WorkerTable, name: str) -> None:
    n = table.inflight.get(name, 1) - 1
    if n <= 0:
        table.inflight.pop(name, None)
    else:
        table.inflight[name] = n


def now() -> int:
    return int(time.time())
