"""Per-request bookkeeping of the API server: one log line per request with its id, and metrics.

`ObserveMiddleware` (plain ASGI, so client disconnects still reach the handlers) opens a
`RequestRecord` in a context variable for each `/v1` request; the serving classes, the pipeline
and the transport note in it what only they know (the model once it is known to be served,
tokens, the first token's time, failovers) through the small functions below, and the
middleware logs and counts it when the answer ends.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrelay.metrics import ApiMetrics

log = logging.getLogger("llmrelay.api")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
             "/v1/messages/count_tokens", "/v1/messages")


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
    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        rec = RequestRecord(started=time.monotonic())
        token = _current.set(rec)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            self.record(scope, rec, 499 if rec.cancelled else status)

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
