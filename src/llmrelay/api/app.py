"""The API server's app: builds the worker table, the controller feed, the transport to workers
(with the FastChat adapter) and the serving objects of the front doors; adds the middlewares
(CORS, body limit, metrics and logs, request ids) and mounts the routes (routes.py)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from llmrelay.api import errors, routes
from llmrelay.api.auth import KeyChecker
from llmrelay.api.chat.serving import ChatServing
from llmrelay.api.completions.serving import CompletionServing
from llmrelay.api.embeddings.serving import EmbeddingServing
from llmrelay.api.fastchat import FastChatAdapter
from llmrelay.api.feed import ControllerFeed
from llmrelay.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from llmrelay.api.models.serving import ModelServing
from llmrelay.api.observe import ObserveMiddleware
from llmrelay.api.ondemand.loads import Loads
from llmrelay.api.ondemand.middleware import OnDemandMiddleware
from llmrelay.api.pipeline import Limits, Pipeline
from llmrelay.api.table import WorkerTable
from llmrelay.api.transport import WorkerTransport
from llmrelay.config import split_csv
from llmrelay.metrics import ApiMetrics
from llmrelay.security import auth_headers, token_from

log = logging.getLogger("llmrelay.api")


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
    load_queue: int = 64,
) -> FastAPI:
    headers = auth_headers(registration_token)
    table = WorkerTable(controllers)
    feed = ControllerFeed(table, refresh=table_refresh, headers=headers)
    side = httpx.AsyncClient(  # side questions to workers (FastChat workers' templates, ...)
        timeout=httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        headers=headers,
    )
    transport = WorkerTransport(table, side, FastChatAdapter(side), headers=headers)
    pipeline = Pipeline(transport, Limits(request_timeout, sse_keepalive))
    keys = KeyChecker(api_keys or [])
    loads = Loads(table, side, feed.fetch_once, load_queue)  # models on demand
    table.declared_names = lambda: loads.declared().keys()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await feed.fetch_once()
        feed.start()
        yield
        await feed.aclose()
        await transport.aclose()

    app = FastAPI(title="llmrelay OpenAI-compatible API", lifespan=lifespan)
    errors.install(app)

    def key_accepted(scope: Any) -> bool:
        try:
            keys.check(Request(scope))
        except errors.APIError:
            return False
        return True

    # Innermost: a request for a model loaded on demand waits here for its load.
    app.add_middleware(OnDemandMiddleware, loads=loads, authorized=key_accepted,
                       keepalive=sse_keepalive)
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
    routes.mount(app, guarded, feed, metrics,
                 chat=ChatServing(table, pipeline), completions=CompletionServing(table, pipeline),
                 embeddings=EmbeddingServing(table, transport),
                 models=ModelServing(table, loads.declared))
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
        args.load_queue,
    )
    log.info("OpenAI-compatible API on http://%s:%d/v1 (%s)", args.host, args.port,
             "API keys required" if keys else "no API keys")
    serve(app, args.host, args.port, args.log_level, args.ssl, args.shutdown_timeout)
