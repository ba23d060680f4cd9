"""The API server's app: routes, auth, CORS, request ids, and the worker table's lifetime."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from llmrelay.api import chat, completions, embeddings, errors, models
from llmrelay.api.auth import KeyChecker
from llmrelay.api.routing import WorkerTable
from llmrelay.config import split_csv

log = logging.getLogger("llmrelay.api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(
    controllers: list[str],
    api_keys: list[str] | None = None,
    allowed_origins: list[str] | None = None,
    allowed_methods: list[str] | None = None,
    allowed_headers: list[str] | None = None,
    allow_credentials: bool = False,
    table_refresh: float = 1.0,
) -> FastAPI:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
    )
    table = WorkerTable(controllers, client, refresh=table_refresh)
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
    errors.install(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=allowed_origins or ["*"],
        allow_methods=allowed_methods or ["*"],
        allow_headers=allowed_headers or ["*"],
        allow_credentials=allow_credentials,
        expose_headers=["X-Request-ID"],
    )

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                         ) -> Response:
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:24]
        request.state.request_id = rid
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    def authorized(request: Request) -> None:
        keys.check(request)

    guarded: list[Any] = [Depends(authorized)]
    app.add_api_route("/v1/models", models.list_models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/models/{model:path}", models.get_model, methods=["GET"],
                      dependencies=guarded)
    app.add_api_route("/v1/chat/completions", chat.chat_completions, methods=["POST"],
                      dependencies=guarded)
    app.add_api_route("/v1/completions", completions.completions, methods=["POST"],
                      dependencies=guarded)
    app.add_api_route("/v1/embeddings", embeddings.embeddings, methods=["POST"],
                      dependencies=guarded)

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
    warn_public_bind(args.host, "the API server", protected=bool(keys))
    app = create_app(
        split_csv(args.controller_address), keys, args.allowed_origins, args.allowed_methods,
        args.allowed_headers, args.allow_credentials, args.table_refresh,
    )
    log.info("OpenAI-compatible API on http://%s:%d/v1 (%s)", args.host, args.port,
             "API keys required" if keys else "no API keys")
    serve(app, args.host, args.port, args.log_level, args.ssl)
