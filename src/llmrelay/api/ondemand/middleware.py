"""Holds a request for a declared model until the model is loaded, for every front door at once
(chat, completions, embeddings, and any later one whose body names a `model`): the route then
finds the model's worker in the table as for any other model.

Plain ASGI, innermost (inside the body limit, outside the routes). For a POST to a generation
path while some host declares models, it reads the body (then replays it to the route), and
when the body's `model` is declared and not routable it waits for `Loads.ready`:
- a client that leaves while waiting stops waiting (the load is let go if nobody else wants it);
- a streamed request that waits longer than the SSE keep-alive gets its 200 and `: loading`
  comments meanwhile, then the answer's events (an error as an error event);
- a 429 or 503 answer (the worker went away, or refused as it drains for an unload) is held
  back and the request tried again after asking the host, up to three times in all: a request
  is never lost to a swap.
Requests whose API key the server would refuse are passed on untouched (the route answers
401): only users the server accepts can cause a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrelay.api.errors import APIError
from llmrelay.api.ondemand.loads import MISSING, Loads
from llmrelay.jsonguard import too_deep
from llmrelay.protocol import dumps, error_body, loads
from llmrelay.runtime import client_gone

log = logging.getLogger("llmrelay.api")

PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                   "/v1/messages"})
TRIES = 3
SSE_START: Message = {"type": "http.response.start", "status": 200, "headers": [
    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no")]}


class Gone(Exception):
    """The client left while its model was loading."""


class Gate:
    """The route's answer, passed on or held back: a 429/503 is held (to try again) while
    `hold`; after our own SSE start, the route's start is dropped and an error body becomes an
    error event."""

    def __init__(self, send: Send, hold: bool, sse_started: bool) -> None:
        self.send = send
        self.hold = hold
        self.sse_started = sse_started
        self.held = False
        self.convert = False
        self.body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            if self.hold and status in (429, 503):
                self.held = True
            elif self.sse_started:
                self.convert = status != 200
            else:
                await self.send(message)
            return
        if self.held:
            return
        if self.convert:
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                await self.send({"type": "http.response.body", "more_body": False,
                                 "body": sse_error(self.body)})
            return
        await self.send(message)


def sse_error(body: bytes) -> bytes:
    try:
        data = loads(body)
    except ValueError:
        data = error_body(body.decode(errors="replace")[:500], "server_error")
    return b"data: " + dumps(data) + b"\n\ndata: [DONE]\n\n"


def peek(body: bytes) -> tuple[str, Any, bool] | None:
    """(model, keep_alive or MISSING, stream) of a JSON body; None if it names no model, or
    nests too deeply to be read (the route refuses it: body.py)."""
    if too_deep(body):
        return None
    try:
        data = loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return None
    return data["model"], data.get("keep_alive", MISSING), bool(data.get("stream"))


class OnDemandMiddleware:
    def __init__(self, app: ASGIApp, loads: Loads, authorized: Callable[[Scope, str], bool],
                 keepalive: float = 10.0) -> None:
        self.app = app
        self.loads = loads
        self.authorized = authorized
        self.keepalive = keepalive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS
                or not self.loads.declared()):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
        except HTTPException as e:  # the body limit
            await APIError(e.status_code, str(e.detail)).response()(scope, receive, send)
            return
        if body is None:
            return  # the client left while sending
        replay = replayer(body, receive)
        info = peek(body)
        if info is None or info[0] not in self.loads.declared() or not self.authorized(scope, info[0]):
            await self.app(scope, replay(), send)
            return
        model, keep_alive, stream = info
        sse = [False]
        for attempt in range(TRIES):
            try:
                await self.wait(model, keep_alive if attempt == 0 else MISSING, attempt > 0,
                                stream, receive, send, sse)
            except Gone:
                return
            except APIError as e:
                if sse[0]:
                    await send({"type": "http.response.body", "more_body": False,
                                "body": sse_error(dumps(e.body()))})
                else:
                    await e.response()(scope, receive, send)
                return
            gate = Gate(send, hold=attempt < TRIES - 1, sse_started=sse[0])
            await self.app(scope, replay(), gate)
            if not gate.held:
                return
            log.info("model %s: its worker refused the request (unloading?); asking its host "
                     "and trying again", model)

    async def wait(self, model: str, keep_alive: Any, force: bool, stream: bool,
                   receive: Receive, send: Send, sse: list[bool]) -> None:
        """Until `model` is routable; a streamed request waiting longer than the keep-alive gets
        its SSE start and comments meanwhile (`sse[0]` says they were sent)."""
        if self.loads.quick(model, keep_alive, force):
            return
        task = asyncio.ensure_future(self.loads.ready(model, keep_alive, force))
        watcher = asyncio.ensure_future(client_gone(receive))
        try:
            while True:
                done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=self.keepalive if stream else None)
                if watcher in done:
                    raise Gone
                if task in done:
                    task.result()
                    return
                if not sse[0]:
                    await send(SSE_START)
                    sse[0] = True
                await send({"type": "http.response.body", "more_body": True,
                            "body": f": loading model {model}\n\n".encode()})
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def replayer(body: bytes, receive: Receive) -> Callable[[], Receive]:
    """A fresh `receive` for each try: the body once, then the client's own messages (its
    disconnect)."""

    def fresh() -> Receive:
        sent = False

        async def again() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return again

    return fresh
