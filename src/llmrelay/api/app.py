"""The API server's app: routes, auth, CORS, request ids, and the worker table's lifetime."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrelay.api import chat, completions, embeddings, errors, models
from llmrelay.api.auth import KeyChecker
from llmrelay.api.observe import ObserveMiddleware
from llmrelay.api.routing import WorkerTable
from llmrelay.config import split_csv
from llmrelay.metrics import ApiMetrics, metrics_response
from llmrelay.security import auth_headers, token_from
from llmrelay.status import rows as status_rows

WEBUI = Path(__file__).parent / "webui"
# The chat page loads only its own files; model text is escaped before rendering, and this
# policy forbids inline scripts and handlers even if something slipped through.
WEBUI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

log = logging.getLogger("llmrelay.api")

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
    """413 for bodies over the limit: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await errors.APIError(413, BodyTooLarge(self.max_bytes).detail).response()(
                scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # FastAPI re-raises HTTPExceptions as is
            return message

        await self.app(scope, limited, send)


def create_app(
    controllers: list[str],
    api_keys: list[str] | None = None,
    allowed_origins: list[str] | None = None,
    allowed_methods: list[str] | None = None,
    allowed_headers: list[str] | None = None,
    allow_credentials: bool = False,
    table_refresh: float = 1.0,
    registration_token: str | None = None,
    max_request_bytes: int = 4 * 1024 * 1024,
    request_timeout: float = 600.0,
    sse_keepalive: float = 10.0,
) -> FastAPI:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        headers=auth_headers(registration_token),
    )
    table = WorkerTable(controllers, client, refresh=table_refresh,
                        headers=auth_headers(registration_token))
    keys = KeyChecker(api_keys or [])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await table.fetch_once()
        table.start()
        yield
        await table.stop()
        await client.aclose()

    app = FastAPI(title="llmrelay OpenAI-compatible API", lifespan=lifespan)
    app.state.table = table
    app.state.request_timeout = request_timeout
    app.state.sse_keepalive = sse_keepalive
    errors.install(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=allowed_origins or ["*"],
        allow_methods=allowed_methods or ["*"],
        allow_headers=allowed_headers or ["*"],
        allow_credentials=allow_credentials,
        expose_headers=["X-Request-ID"],
    )

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    metrics = ApiMetrics(table)
    app.add_middleware(ObserveMiddleware, metrics=metrics)  # inside RequestIdMiddleware
    app.add_middleware(RequestIdMiddleware)

    async def authorized(request: Request) -> None:  # async: a sync one costs a thread hop
        keys.check(request)

    # Without keys there is nothing to check: no dependency to solve on every request.
    guarded: list[Any] = [Depends(authorized)] if keys.enabled else []
    app.add_api_route("/v1/models", models.list_models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/models/{model:path}", models.get_model, methods=["GET"],
                      dependencies=guarded)
    app.add_api_route("/v1/chat/completions", chat.chat_completions, methods=["POST"],
                      dependencies=guarded)
    app.add_api_route("/v1/completions", completions.completions, methods=["POST"],
                      dependencies=guarded)
    app.add_api_route("/v1/embeddings", embeddings.embeddings, methods=["POST"],
                      dependencies=guarded)

    @app.get("/metrics", dependencies=guarded)
    async def get_metrics() -> Any:
        return metrics_response(metrics.registry)

    @app.get("/api/workers", dependencies=guarded)
    async def api_workers() -> Any:
        """The worker table for the web page's operator view (as `llmrelay status` shows it):
        read from the controller now, else this server's last copy. Guarded by the API keys,
        since it shows internal addresses."""
        for c in table.controllers:
            try:
                r = await client.get(c + "/worker_table", timeout=2.0)
                r.raise_for_status()
                raw = r.json()
                source = c
                break
            except (httpx.HTTPError, ValueError):
                continue
        else:
            source = "last copy (no controller reachable)"
            raw = {"now": time.time(), "dispatch_method": table.dispatch_method, "workers": [
                {"name": w.name, "model_names": w.model_names, "speed": w.speed,
                 "queue_length": w.queue_length, "last_heart_beat": w.last_heart_beat,
                 "status": w.status} for w in table.workers.values()]}
        out = status_rows(raw)
        for row in out:
            row["in_flight_here"] = table.inflight.get(row["address"], 0)
            if row["address"] in table.down:
                row["health"] = "refused connection"
        return {"source": source, "dispatch_method": raw.get("dispatch_method"),
                "heartbeat_interval": raw.get("heartbeat_interval"), "workers": out}

    @app.get("/", include_in_schema=False)
    async def webui_index() -> Any:
        return FileResponse(WEBUI / "index.html", headers=WEBUI_HEADERS)

    app.mount("/webui", StaticFiles(directory=WEBUI), name="webui")

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "controller_reachable": table.controller_ok,
                "workers": len(table.workers), "models": sorted(table.models())}

    return app


def run(args: argparse.Namespace) -> None:
    from llmrelay.config import setup_logging
    from llmrelay.runtime import serve, warn_public_bind

    setup_logging(args.log_level)
    keys = split_csv(args.api_keys)
    if args.api_keys_file:
        try:
            with open(args.api_keys_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise SystemExit(f"error: cannot read --api-keys-file {args.api_keys_file}: "
                             f"{e.strerror}") from e
        if not keys:
            raise SystemExit(f"error: --api-keys-file {args.api_keys_file} holds no key")
    warn_public_bind(args.host, "the API server", protected=bool(keys))
    app = create_app(
        split_csv(args.controller_address), keys, args.allowed_origins, args.allowed_methods,
        args.allowed_headers, args.allow_credentials, args.table_refresh,
        token_from(args.registration_token, args.controller_address), args.max_request_bytes,
        args.request_timeout,
        args.sse_keepalive,
    )
    log.info("OpenAI-compatible API on http://%s:%d/v1 (%s)", args.host, args.port,
             "API keys required" if keys else "no API keys")
    serve(app, args.host, args.port, args.log_level, args.ssl, args.shutdown_timeout)
