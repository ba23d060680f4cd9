"""Running an ASGI app: uvicorn with our logging, the bind warning, and SSL from FastChat's env vars."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import uvicorn
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmrelay.protocol import dumps

log = logging.getLogger("llmrelay")

T = TypeVar("T")

PUBLIC_HOSTS = {"0.0.0.0", "::", ""}


async def client_gone(receive: Receive) -> None:
    """Returns when the client disconnects. Waiting on the server's receive() sees it as it
    happens (polling `request.is_disconnected()` missed it now and then); call it once the
    request body has been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before the work it asked for was done."""


class WorkTimedOut(Exception):
    """The work ran past the time it was given."""


async def until_gone(receive: Receive, work: Awaitable[T], timeout: float | None = None) -> T:
    """`work`'s result, unless the client leaves first (ClientGone) or `timeout` seconds pass
    (WorkTimedOut); either way `work` is cancelled, and awaited, before this raises, so what it
    holds (a generation, a stream to a worker) is released at once. Call it once the request
    body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(client_gone(receive))
    stopped = left = False
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        left = watcher.done()
    finally:
        watcher.cancel()
        if not task.done():
            stopped = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if not stopped:
        return task.result()
    raise ClientGone() if left else WorkTimedOut()


class FastJSONResponse(JSONResponse):
    """A JSON response serialized by `protocol.dumps` (orjson) instead of json."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body generator however the response ends, a client
    that went away included: the generator's cleanup (cancelling a generation, closing the
    stream to a worker) runs at once, not whenever the garbage collector gets to it.

    `cleanup` runs after that: a generator that never started (the client left before the
    first byte) runs no cleanup of its own when closed."""

    def __init__(self, content: Any, *args: Any,
                 cleanup: Callable[[], Awaitable[None]] | None = None, **kwargs: Any) -> None:
        super().__init__(content, *args, **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Starlette's streaming, with plain asyncio tasks instead of an anyio task group (half
        the cost per response): the body is sent while a watcher waits for the client to leave,
        which cancels the body."""
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return

        with contextlib.suppress(ClientGone):
            await until_gone(receive, self.stream_response(send))  # the body's own error raises
        if self.background is not None:
            await self.background()

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + 10
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self.cleanup is not None:
                    await self.cleanup()


def warn_public_bind(host: str, what: str, protected: bool) -> None:
    """Binding every interface without protection is allowed, but said out loud."""
    if host in PUBLIC_HOSTS and not protected:
        log.warning(
            "%s listens on all interfaces (%s) without authentication: anyone who can reach this "
            "machine can use it. Bind 127.0.0.1 or configure keys.",
            what,
            host or "*",
        )


def serve(app: Any, host: str, port: int, log_level: str = "info", ssl: bool = False,
          shutdown_timeout: float = 30.0) -> None:
    """Run `app` until SIGINT/SIGTERM; then finish open requests for up to `shutdown_timeout`.

    If the app sets `app.state.on_exit_signal` (a callable), it runs as soon as the signal
    arrives, before uvicorn waits for open requests: a worker deregisters there, so no new
    work is routed to it while it finishes what it has.
    """
    kwargs: dict[str, Any] = {}
    if ssl:
        kwargs["ssl_keyfile"] = os.environ["SSL_KEYFILE"]
        kwargs["ssl_certfile"] = os.environ["SSL_CERTFILE"]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=log_level.lower() == "debug",
        timeout_graceful_shutdown=int(shutdown_timeout),
        **kwargs,
    )
    server = uvicorn.Server(config)
    original = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        hook = getattr(getattr(app, "state", None), "on_exit_signal", None)
        if hook is not None and not server.should_exit:
            hook()
        original(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    server.run()
