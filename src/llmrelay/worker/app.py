"""The model worker's HTTP face: FastChat's worker endpoints over one engine.

Model work never runs on the event loop: the engine's own thread (or, for an engine without one,
a thread per request) hands chunks to it, so status, heartbeats and token counts answer while
a long generation runs. `--limit-worker-concurrency` bounds the
requests admitted at once; the rest wait (queue length = running + waiting). A client that
disconnects cancels its generation, in the queue or running.

Frames follow FastChat (`text` cumulative) unless the request asks for `delta: true` (our
addition), where `text` is only the new text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmrelay import __version__
from llmrelay.fastchat_conv import STYLES_0_2_36, describe
from llmrelay.metrics import WorkerMetrics, metrics_response
from llmrelay.protocol import OUR_EXTENSIONS, ErrorCode, frame, loads
from llmrelay.runtime import ClientGone, ClosingStreamingResponse, FastJSONResponse, until_gone
from llmrelay.security import TokenGuard, auth_headers
from llmrelay.worker.engines.base import Chunk, Engine, EngineError, GenerationRequest
from llmrelay.worker.lifecycle import ControllerLink
from llmrelay.worker.templates import ChatTemplateError

log = logging.getLogger("llmrelay.worker")


@dataclass
class WorkerSettings:
    worker_address: str
    model_names: list[str]
    controller_addresses: list[str] = field(default_factory=list)
    limit_worker_concurrency: int = 5
    stream_interval: int = 1
    heartbeat_interval: float = 3.0
    register: bool = True
    token: str | None = None  # the cluster's registration token (security.py)
    max_queue: int = 32  # requests that may wait beyond the running ones


class WorkerState:
    """Admission and counters; plain Python. The queue is bounded: past `max_queue` waiting
    requests, and while draining for shutdown, new requests are refused (EngineError 42903),
    which the API server answers by trying another worker, then with 429."""

    def __init__(self, limit: int, max_queue: int = 32) -> None:
        self.limit = max(1, limit)
        self.max_queue = max(0, max_queue)
        self.semaphore = asyncio.Semaphore(self.limit)
        self.running = 0
        self.waiting = 0
        self.served = 0
        self.draining = False

    @property
    def queue_length(self) -> int:
        return self.running + self.waiting

    def admit(self) -> None:
        """Refuse at once when this worker cannot take the request (full or shutting down)."""
        if self.draining:
            raise EngineError("this worker is shutting down", int(ErrorCode.ENGINE_OVERLOADED))
        if self.semaphore.locked() and self.waiting >= self.max_queue:
            raise EngineError(
                f"this worker is full ({self.running} running, {self.waiting} waiting)",
                int(ErrorCode.ENGINE_OVERLOADED),
            )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.admit()
        self.waiting += 1
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self.served += 1
            self.semaphore.release()


def _num(body: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EngineError(f"{key} must be a number", int(ErrorCode.VALIDATION_TYPE_ERROR))
    return kind(value)


def _str_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise EngineError(f"{key} must be a string or a list of strings",
                      int(ErrorCode.VALIDATION_TYPE_ERROR))


def parse_params(body: dict[str, Any], engine: Engine) -> tuple[GenerationRequest, bool]:
    """FastChat's generation params (+ our optional fields) -> (request, delta mode)."""
    messages = body.get("messages")
    prompt = body.get("prompt")
    token_ids = body.get("prompt_token_ids")
    stop = _str_list(body.get("stop"), "stop")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise EngineError("messages must be a list of objects", 40001)
        stop += [s for s in engine.template_stops() if s not in stop]
    elif token_ids is not None:
        if not isinstance(token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in token_ids
        ):
            raise EngineError("prompt_token_ids must be a list of integers", 40001)
    elif not isinstance(prompt, str):
        raise EngineError("prompt must be a string", 40001)
    max_new = body.get("max_new_tokens", 256)
    if max_new is not None:
        max_new = _num(body, "max_new_tokens", 256, int)
        if max_new < 0:
            raise EngineError("max_new_tokens must not be negative", 40302)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _num(body, "logprobs", 0, int)
        if not 0 <= logprobs <= 20:
            raise EngineError("logprobs must be between 0 and 20", 40302)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise EngineError("stop_token_ids must be a list of integers", 40001)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise EngineError("seed must be an integer", 40001)
    req = GenerationRequest(
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=token_ids if messages is None else None,
        messages=messages,
        temperature=_num(body, "temperature", 1.0, float),
        top_p=_num(body, "top_p", 1.0, float),
        top_k=_num(body, "top_k", -1, int),
        max_new_tokens=max_new,
        stop=stop,
        stop_token_ids=stop_ids,
        presence_penalty=_num(body, "presence_penalty", 0.0, float),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, float),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, float),
        seed=seed,
        logprobs=logprobs,
        echo=bool(body.get("echo", True)),  # FastChat's worker echoes unless told not to
        request_id=str(body.get("request_id") or uuid.uuid4().hex[:12]),
        model=body["model"] if isinstance(body.get("model"), str) else None,
    )
    return req, bool(body.get("delta", False))


class Framer:
    """Turns engine chunks into FastChat frames (cumulative text) or delta frames."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.text = ""
        self.tokens: list[dict[str, Any]] = []  # OpenAI-shaped logprob entries so far
        self.offsets: list[int] = []

    def make(self, chunk: Chunk) -> dict[str, Any]:
        start = len(self.text)
        self.text += chunk.text
        new = []
        for lp in chunk.logprobs:
            entry = {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": lp.bytes,
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top
                ],
            }
            new.append(entry)
            self.offsets.append(start)
            start += len(lp.token)
        self.tokens.extend(new)
        out: dict[str, Any] = {
            "text": chunk.text if self.delta else self.text,
            "error_code": 0,
            "usage": {
                "prompt_tokens": chunk.prompt_tokens,
                "completion_tokens": chunk.completion_tokens,
                "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
            },
            "finish_reason": chunk.finish_reason,
        }
        if self.delta:
            out["logprobs"] = {"content": new} if new else None
        elif self.tokens:
            # FastChat's cumulative shape.
            out["logprobs"] = {
                "text_offset": list(self.offsets),
                "tokens": [t["token"] for t in self.tokens],
                "token_logprobs": [t["logprob"] for t in self.tokens],
                "top_logprobs": [
                    {a["token"]: a["logprob"] for a in t["top_logprobs"]} for t in self.tokens
                ],
            }
        else:
            out["logprobs"] = None
        return out


def error_frame(e: Exception) -> dict[str, Any]:
    if isinstance(e, EngineError):
        return {"text": str(e), "error_code": e.code}
    if isinstance(e, ChatTemplateError):
        return {"text": str(e), "error_code": int(ErrorCode.VALIDATION_TYPE_ERROR)}
    return {"text": f"internal error in the worker: {type(e).__name__}",
            "error_code": int(ErrorCode.INTERNAL_ERROR)}


class Mailbox:
    """Hands items from engine threads to queues on the event loop, waking the loop once for
    everything posted before it runs (a batch step's chunks of every stream), not once per item."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[tuple[asyncio.Queue[Any], Any]] = deque()
        self.scheduled = False

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:  # any thread
        self.items.append((queue, item))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop is closed: nobody reads this any more
                pass

    def _drain(self) -> None:  # the event loop
        self.scheduled = False  # before draining: an item posted from now on schedules again
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


async def run_engine(engine: Engine, req: GenerationRequest, cancel: threading.Event,
                     mailbox: Mailbox) -> AsyncIterator[list[Chunk]]:
    """Start a generation and yield its chunks here, as lists of the chunks ready at once: when
    the event loop falls behind the engine (many streams, a fast model), they go out in one
    write instead of one write (and one wake-up of the reader) each. The engine's thread posts
    chunks straight to this event loop (`Engine.start`)."""
    queue: asyncio.Queue[Chunk | Exception | None] = asyncio.Queue()

    def emit(item: Chunk | Exception | None) -> None:
        mailbox.post(queue, item)

    try:
        await asyncio.to_thread(engine.start, req, cancel, emit)  # renders and tokenizes
        while True:
            batch: list[Chunk] = []
            item = await queue.get()
            while isinstance(item, Chunk):
                batch.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield batch
            if item is None:
                return
            if isinstance(item, Exception):
                if not isinstance(item, (EngineError, ChatTemplateError)):
                    log.error("request %s failed in the engine", req.request_id, exc_info=item)
                raise item
    finally:
        cancel.set()  # no-op when finished; stops the engine when the consumer went away


def create_app(engine: Engine, settings: WorkerSettings) -> FastAPI:
    state = WorkerState(settings.limit_worker_concurrency, settings.max_queue)
    client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), headers=auth_headers(settings.token))
    links = [
        ControllerLink(client, c, settings.worker_address, lambda: status(),
                       settings.heartbeat_interval)
        for c in settings.controller_addresses
    ] if settings.register else []

    def status() -> dict[str, Any]:
        return {
            "model_names": settings.model_names,
            "speed": 1,
            "queue_length": state.queue_length,
            "llmrelay": {
                "version": __version__,
                "extensions": OUR_EXTENSIONS,
                "engine": engine.name,
                "context_length": engine.context_length(),
                "embeddings": engine.supports_embeddings(),
                "embedding_dimensions": getattr(engine, "dimensions", list)(),
                "limit_worker_concurrency": state.limit,
                "running": state.running,
                "served": state.served,
                "pid": os.getpid(),
                **engine.status(),  # e.g. `ready`, and an upstream server's health
            },
        }

    async def leave() -> None:
        """Stop heartbeats and deregister, so no new work is routed here."""
        for t in tasks:
            t.cancel()
        await asyncio.gather(*(link.deregister() for link in links if link.registered))
        for link in links:
            link.registered = False

    tasks: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def on_exit_signal() -> None:  # runs in the signal handler, before requests drain
            state.draining = True
            log.info("shutting down: deregistering, refusing new requests, finishing %d running",
                     state.queue_length)
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(leave()))

        app.state.on_exit_signal = on_exit_signal
        tasks.extend(asyncio.create_task(link.run()) for link in links)
        log.info("worker %s serving %s", settings.worker_address, ", ".join(settings.model_names))
        yield
        await leave()
        await client.aclose()
        # Here, not after uvicorn returns: on SIGTERM uvicorn re-raises the signal once it has
        # shut down, which ends the process before any code after serve() runs.
        await asyncio.to_thread(engine.close)
        log.info("engine %s closed", engine.name)

    app = FastAPI(title="llmrelay model worker", lifespan=lifespan)
    app.add_middleware(TokenGuard, token=settings.token)
    app.state.status = status
    app.state.worker_state = state

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            data = loads(await request.body())
        except ValueError as e:
            raise EngineError(f"the body is not valid JSON: {e}", 40001) from e
        if not isinstance(data, dict):
            raise EngineError("the body must be a JSON object", 40001)
        return data

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        return JSONResponse(error_frame(e), status_code=400)

    mailboxes: list[Mailbox] = []

    def mailbox() -> Mailbox:
        if not mailboxes:
            mailboxes.append(Mailbox(asyncio.get_running_loop()))
        return mailboxes[0]

    async def generate_frames(req: GenerationRequest, delta: bool) -> AsyncIterator[list[dict]]:
        """Lists of frames ready at once (see run_engine)."""
        cancel = threading.Event()
        framer = Framer(delta)
        started = time.monotonic()
        last: dict[str, Any] | None = None
        pending_tokens = 0
        outcome = "cancelled"  # unless it ends otherwise: the consumer went away
        first_at: float | None = None
        try:
            async with state.slot():
                async for chunks in run_engine(engine, req, cancel, mailbox()):
                    out = []
                    if first_at is None:
                        first_at = time.monotonic()
                    for chunk in chunks:
                        pending_tokens += 1
                        f = framer.make(chunk)
                        last = f
                        if (chunk.finish_reason is None and delta is False
                                and pending_tokens < settings.stream_interval):
                            continue
                        pending_tokens = 0
                        out.append(f)
                    if out:
                        yield out
            outcome = "ok"
        except (EngineError, ChatTemplateError) as e:
            outcome = "refused" if getattr(e, "code", 0) == ErrorCode.ENGINE_OVERLOADED else "invalid"
            log.info("request %s refused: %s", req.request_id, e)
            yield [error_frame(e)]
            return
        except Exception as e:  # never a silent cut: the client gets an error frame
            outcome = "error"
            log.exception("request %s failed", req.request_id)
            yield [error_frame(e)]
            return
        finally:
            cancel.set()
            observe(req, outcome, started, first_at, last)
        if last is not None:
            u = last["usage"]
            log.info(
                "request %s: %d prompt + %d completion tokens, %s, %.2f s",
                req.request_id, u["prompt_tokens"], u["completion_tokens"],
                last["finish_reason"], time.monotonic() - started,
            )

    metrics = WorkerMetrics(state)

    def observe(req: GenerationRequest, outcome: str, started: float, first_at: float | None,
                last: dict[str, Any] | None) -> None:
        model = req.model if req.model in settings.model_names else settings.model_names[0]
        metrics.requests.labels(model, outcome).inc()
        metrics.latency.labels(model).observe(time.monotonic() - started)
        if first_at is not None:
            metrics.ttft.labels(model).observe(first_at - started)
        u = (last or {}).get("usage") or {}
        metrics.prompt_tokens.labels(model).inc(int(u.get("prompt_tokens") or 0))
        metrics.completion_tokens.labels(model).inc(int(u.get("completion_tokens") or 0))
        if outcome == "cancelled":
            log.info("request %s cancelled by the client after %d completion tokens, %.2f s",
                     req.request_id, int(u.get("completion_tokens") or 0),
                     time.monotonic() - started)

    @app.get("/metrics")
    async def get_metrics() -> Any:
        return metrics_response(metrics.registry)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Any:
        req, delta = parse_params(await body_of(request), engine)

        async def body() -> AsyncIterator[bytes]:
            async for frames in generate_frames(req, delta):
                yield b"".join(frame(f) for f in frames)

        return ClosingStreamingResponse(body(), media_type="application/octet-stream")

    @app.post("/worker_generate")
    async def worker_generate(request: Request) -> Any:
        """The whole answer as one frame: FastChat's last cumulative frame, or with `delta`
        (our extension) one delta frame joining all of them, whose logprobs also carry each
        token's `text_offset` in the text (an echoed prompt has no logprob entries)."""
        req, delta = parse_params(await body_of(request), engine)

        async def collect() -> dict[str, Any]:
            final: dict[str, Any] = {}
            text = ""
            entries: list[dict[str, Any]] = []
            offsets: list[int] = []
            async for frames in generate_frames(req, delta):
                for f in frames:
                    final = f
                    if f.get("error_code"):  # the last frame there is
                        break
                    if not delta:
                        text = f.get("text", text)
                        continue
                    if f.get("logprobs"):
                        pos = len(text)
                        for e in f["logprobs"]["content"]:
                            entries.append(e)
                            offsets.append(pos)
                            pos += len(e["token"])
                    text += f.get("text", "")
            if final.get("error_code"):
                return final
            final["text"] = text
            if delta:
                final["logprobs"] = ({"content": entries, "text_offset": offsets}
                                     if entries else None)
            return final

        try:
            return FastJSONResponse(await until_gone(request.receive, collect()))
        except ClientGone:  # collect() was cancelled, which stopped the engine thread
            return JSONResponse({"text": "client disconnected", "error_code": 50001}, 499)

    @app.api_route("/worker_get_status", methods=["GET", "POST"])
    async def worker_get_status() -> Any:
        return status()

    @app.post("/count_token")
    async def count_token(request: Request) -> Any:
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list):  # our API server may count chat messages
            prompt = await asyncio.to_thread(engine.render_chat, prompt)
        if not isinstance(prompt, str):
            raise EngineError("prompt must be a string", 40001)
        return {"count": await asyncio.to_thread(engine.count_tokens, prompt), "error_code": 0}

    @app.post("/model_details")
    async def model_details() -> Any:
        return {"context_length": engine.context_length()}

    conv_cache: list[dict[str, Any]] = []

    def describe_template() -> dict[str, Any]:
        """The model's chat template as a FastChat conversation (made once)."""
        tpl = engine.chat_template
        name = f"llmrelay-{tpl.name if tpl else 'none'}"
        d = describe(engine.render_chat, name, engine.template_stops())
        if not d.exact:
            log.warning(
                "the chat template of %s cannot be expressed exactly as a FastChat conversation: "
                "/worker_get_conv_template describes the closest one (%s style), so prompts "
                "rendered by FastChat's API server differ from the model's template (%s). Our "
                "API server is not affected: it sends chat messages and the worker renders them.",
                ", ".join(settings.model_names), STYLES_0_2_36[d.conv["sep_style"] - 1], d.note)
        return {**d.conv, "llmrelay_exact": d.exact}

    @app.post("/worker_get_conv_template")
    async def worker_get_conv_template() -> Any:
        # FastChat's API server renders prompts with this; it is read off the model's own chat
        # template (fastchat_conv.describe), not hand-written per model as FastChat does.
        if not conv_cache:
            conv_cache.append(await asyncio.to_thread(describe_template))
        return {"conv": conv_cache[0]}

    @app.post("/worker_get_embeddings")
    async def worker_get_embeddings(request: Request) -> Any:
        body = await body_of(request)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, list) and texts and all(
                isinstance(t, int) and not isinstance(t, bool) for t in texts):
            texts = [texts]  # one input given as token ids
        if not isinstance(texts, list) or not all(
            isinstance(t, str) or (isinstance(t, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in t))
            for t in texts
        ):
            raise EngineError("input must be a string, a list of strings, or token id arrays", 40001)
        async with state.slot():
            vectors, n = await asyncio.to_thread(engine.embed, texts)
        return {"embedding": vectors, "token_num": n}

    return app
