"""The API server's own ASGI middlewares: request ids, and the request body size limit. Plain
ASGI (not BaseHTTPMiddleware), so client disconnects still reach the handlers, which cancel the
generation on the worker."""

from __future__ import annotations

import re
import uuid

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrelay.api.errors import APIError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Accepts a safe `X-Request-ID` or makes one, exposes it as `request.state.request_id`,
    and returns it. Plain ASGI (not BaseHTTPMiddleware), so client disconnects still reach the
    handlers, which cancel the generation on the worker."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than this server accepts "
                              f"({limit} bytes; see --max-request-bytes).")


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while reading. `paths`:
    other limits for some exact paths (file uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.max_bytes)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await APIError(413, BodyTooLarge(limit).detail).response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)  # FastAPI re-raises HTTPExceptions as is
            return message

        await self.app(scope, limited, send)
