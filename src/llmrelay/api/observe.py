"""Per-request bookkeeping of the API server: one log line per request with its id, and metrics.

`ObserveMiddleware` (plain ASGI, so client disconnects still reach the handlers) opens a
`RequestRecord` in a context variable for each `/v1` request; the serving classes, the pipeline
and the transport note in it what only they know (the model once it is known to be served,
tokens, the first token's time, failovers) through the small functions below, and the
middleware logs and counts it when the answer ends.

The record also carries the caller's API key (set by authentication) and the usage the answer
reported; the middleware's `finish` hook (access.py: limits, the usage store, the per-key
metrics) runs once per request and is awaited before the last bytes of the answer go out, so a
client that has its whole answer also finds it counted, durably: a whole answer's single body
message waits for it; a streamed answer's body calls `settle()` before each write, which runs
the hook once the generation has ended (`note_complete`), so the final events (`[DONE]`,
`message_stop`, `response.completed`) leave after it.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrelay.metrics import ApiMetrics

if TYPE_CHECKING:
    from llmrelay.api.keys import Key

log = logging.getLogger("llmrelay.api")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
             "/v1/messages/count_tokens", "/v1/messages", "/v1/responses", "/v1/usage")


@dataclass
class RequestRecord:
    started: float
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    failovers: int = 0
    cancelled: bool = False
    migrations: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, from, to)
    key: Key | None = None  # who asks (None: the server has no API keys)
    admitted: bool = False  # counted against the key's limits (access.py)
    billed: tuple[int, int] | None = None  # (prompt, completion) as the answer's `usage` says
    status: int = 0  # the HTTP status, once the answer started
    complete: bool = False  # every generation of the answer ended (note_complete)
    settle: Callable[[], Awaitable[None]] | None = None  # runs `finish` now (once), by the middleware


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "llmrelay_request", default=None)


def note_model(model: str) -> None:
    """The request's model is served (only then is it used as a label)."""
    rec = _current.get()
    if rec is not None:
        rec.model = model


def note_first_token() -> None:
    rec = _current.get()
    if rec is not None and rec.first_token is None:
        rec.first_token = time.monotonic()


def note_usage(prompt_tokens: int, completion_tokens: int) -> None:
    rec = _current.get()
    if rec is not None:
        rec.prompt_tokens += prompt_tokens
        rec.completion_tokens += completion_tokens


def note_billed(prompt_tokens: int, completion_tokens: int) -> None:
    """The usage an answer reports to its client (the pipeline's `usage_of`), which is what the
    key is charged; without it (a stream cut short) the tokens the workers reported count."""
    rec = _current.get()
    if rec is not None:
        rec.billed = (prompt_tokens, completion_tokens)


def note_complete() -> None:
    """Every generation of a streamed answer has ended: what is left to send is its last
    events, which `settle` holds back until the answer is charged."""
    rec = _current.get()
    if rec is not None:
        rec.complete = True


async def settle() -> None:
    """Called by a streamed answer's body before each write: once the generation ended, charge
    the request (the middleware's `finish`, once) before the answer's last events go out."""
    rec = _current.get()
    if rec is not None and rec.complete and rec.settle is not None:
        await rec.settle()


def note_key(key: Key | None) -> None:
    """The API key the request was authenticated with."""
    rec = _current.get()
    if rec is not None:
        rec.key = key


def begin(rec: RequestRecord) -> None:
    """Make `rec` the record of the task running now: a request served without HTTP (a batch's
    line, api/batch/execute.py), whose task's context ends with it."""
    _current.set(rec)


def current() -> RequestRecord | None:
    """The record of the request being served here, if any."""
    return _current.get()


def note_failover() -> None:
    rec = _current.get()
    if rec is not None:
        rec.failovers += 1


def note_migration(reason: str, old: str, new: str) -> None:
    """A started generation moved from worker `old` to `new` (api/migration.py)."""
    rec = _current.get()
    if rec is not None:
        rec.migrations.append((reason, old, new))


def note_cancelled() -> None:
    """The client went away before the answer ended."""
    rec = _current.get()
    if rec is not None:
        rec.cancelled = True


def endpoint_of(path: str) -> str:
    for e in ENDPOINTS:
        if path == e or path.startswith(e + "/"):
            return e
    return "other"


class ObserveMiddleware:
    """`finish`: called once per `/v1` request with its record, just before the answer's last
    body message is sent (or when the request ends without one)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics,
                 finish: Callable[[RequestRecord], Awaitable[None]] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        rec = RequestRecord(started=time.monotonic())
        token = _current.set(rec)
        rec.status = 500
        finished = False

        async def finish() -> None:
            nonlocal finished
            if not finished and self.finish is not None:
                finished = True
                await self.finish(rec)

        rec.settle = finish
        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                rec.status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                await finish()
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            if rec.cancelled:
                rec.status = 499
            await finish()
            self.record(scope, rec, rec.status)

    def record(self, scope: Scope, rec: RequestRecord, status: int) -> None:
        m = self.metrics
        endpoint = endpoint_of(scope["path"])
        model = rec.model
        elapsed = time.monotonic() - rec.started
        m.requests.labels(endpoint, model, str(status)).inc()
        m.latency.labels(endpoint, model).observe(elapsed)
        if rec.failovers:
            m.failovers.labels(model).inc(rec.failovers)
        for reason, _, _ in rec.migrations:
            m.migrations.labels(model, reason).inc()
        if rec.prompt_tokens:
            m.prompt_tokens.labels(model).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            m.completion_tokens.labels(model).inc(rec.completion_tokens)
        if rec.first_token is not None:
            m.ttft.labels(model).observe(rec.first_token - rec.started)
        rid = (scope.get("state") or {}).get("request_id", "-")
        moved = "".join(f", moved from {old} to {new} ({why})" for why, old, new in rec.migrations)
        log.info("request %s: %s %s model=%s -> %d, %d prompt + %d completion tokens, %.2f s%s%s",
                 rid, scope["method"], scope["path"], model or "-", status, rec.prompt_tokens,
                 rec.completion_tokens, elapsed,
                 f", {rec.failovers} failover(s)" if rec.failovers else "", moved)
