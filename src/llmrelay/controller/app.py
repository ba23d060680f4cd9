"""The controller's HTTP face: FastChat's endpoints over the Registry, plus `/worker_table`.

Thin: each route validates its body and calls the registry or the dispatch policy. It never
touches a model. The only outbound calls are the FastChat-compatible ones (status polls when a
registration carries no status, `/refresh_all_workers`, the `/worker_generate_stream` proxy),
made with one pooled async client so the event loop never blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmrelay.dispatch import pick
from llmrelay.controller.registry import Registry
from llmrelay.metrics import ControllerMetrics, metrics_response
from llmrelay.protocol import ErrorCode, frame
from llmrelay.runtime import ClosingStreamingResponse
from llmrelay.security import TokenGuard, auth_headers, token_from

log = logging.getLogger("llmrelay.controller")


def valid_worker_url(url: Any) -> str | None:
    """Why `url` cannot be a worker address, or None when it is a plain http(s) URL."""
    if not isinstance(url, str) or not url:
        return "worker_name must be the worker's http(s) URL"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"worker_name must be an http(s) URL with a host, got {url[:200]!r}"
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        return "worker_name must not carry a query, fragment or credentials"
    return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status)


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def create_app(dispatch_method: str = "shortest_queue", heartbeat_interval: float = 3.0,
               token: str | None = None) -> FastAPI:
    registry = Registry(heartbeat_interval=heartbeat_interval)
    metrics = ControllerMetrics(registry)
    client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), limits=httpx.Limits(max_connections=200),
                               headers=auth_headers(token))

    async def sweep() -> None:
        while True:
            await asyncio.sleep(max(registry.heartbeat_interval / 2, 0.2))
            for name in registry.expire():
                metrics.expirations.inc()
                log.warning(
                    "worker %s missed %d heartbeats; removed from the table",
                    name,
                    int(registry.expiration / registry.heartbeat_interval),
                )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(sweep())
        log.info(
            "controller ready: dispatch %s, heartbeat every %.1f s, expiry after %.1f s",
            dispatch_method,
            registry.heartbeat_interval,
            registry.expiration,
        )
        yield
        task.cancel()
        await client.aclose()

    app = FastAPI(title="llmrelay controller", lifespan=lifespan)
    app.add_middleware(TokenGuard, token=token, open_paths=frozenset({"/test_connection"}))
    app.state.registry = registry
    app.state.dispatch_method = dispatch_method

    async def fetch_status(url: str) -> dict[str, Any] | None:
        try:
            r = await client.post(url.rstrip("/") + "/worker_get_status", json={})
            r.raise_for_status()
            data = r.json()
            return data if isinstance(data, dict) and "model_names" in data else None
        except (httpx.HTTPError, ValueError) as e:
            log.warning("could not read the status of worker %s: %s", url, e)
            return None

    @app.post("/register_worker")
    async def register_worker(request: Request) -> Any:
        body = await _body(request)
        name = body.get("worker_name")
        problem = valid_worker_url(name)
        if problem:
            return _error(400, problem)
        status = body.get("worker_status")
        if not isinstance(status, dict):
            status = await fetch_status(name)
            if status is None:
                return _error(400, f"worker {name} did not answer /worker_get_status")
        if not isinstance(status.get("model_names"), list):
            return _error(400, "worker_status.model_names must be a list of names")
        known = name in registry.workers
        metrics.registrations.labels("again" if known else "new").inc()
        registry.register(
            name,
            status,
            check_heart_beat=bool(body.get("check_heart_beat", True)),
            multimodal=bool(body.get("multimodal", False)),
        )
        log.info(
            "%s worker %s serving %s",
            "re-registered" if known else "registered",
            name,
            ", ".join(status["model_names"]),
        )
        return None

    @app.post("/deregister_worker")
    async def deregister_worker(request: Request) -> Any:
        body = await _body(request)
        name = body.get("worker_name")
        if registry.remove(str(name)):
            metrics.deregistrations.inc()
            log.info("worker %s deregistered", name)
        return {"removed": True}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> Any:
        body = await _body(request)
        try:
            queue_length = int(body.get("queue_length", 0))
        except (TypeError, ValueError):
            return _error(400, "queue_length must be an integer")
        extra = body.get("worker_status") if isinstance(body.get("worker_status"), dict) else None
        exist = registry.heartbeat(str(body.get("worker_name")), queue_length, extra)
        metrics.heartbeats.labels(str(exist).lower()).inc()
        return {"exist": exist}

    @app.api_route("/list_models", methods=["GET", "POST"])
    async def list_models() -> Any:
        return {"models": registry.list_models()}

    @app.api_route("/list_language_models", methods=["GET", "POST"])
    async def list_language_models() -> Any:
        return {"models": registry.list_models(multimodal=False)}

    @app.api_route("/list_multimodal_models", methods=["GET", "POST"])
    async def list_multimodal_models() -> Any:
        return {"models": registry.list_models(multimodal=True)}

    def choose(model: str) -> str:
        chosen = pick(dispatch_method, registry.workers_for(model))
        if chosen is None:
            return ""
        if dispatch_method in ("shortest_queue", "prefix"):
            # Count the request until the worker's next heartbeat says otherwise (as FastChat does).
            chosen.queue_length += 1
        return chosen.name

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> Any:
        body = await _body(request)
        return {"address": choose(str(body.get("model", "")))}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> Any:
        old = list(registry.workers.values())
        statuses = await asyncio.gather(*(fetch_status(w.name) for w in old))
        for w, status in zip(old, statuses, strict=True):
            if status is None:
                registry.remove(w.name)
                log.warning("worker %s did not answer a refresh; removed", w.name)
            else:
                registry.register(w.name, status, w.check_heart_beat, w.multimodal)
        return None

    @app.post("/worker_get_status")
    async def worker_get_status() -> Any:
        """The controller seen as one worker (FastChat's hierarchical mode)."""
        workers = list(registry.workers.values())
        return {
            "model_names": registry.list_models(),
            "speed": sum(w.speed for w in workers),
            "queue_length": sum(w.queue_length for w in workers),
        }

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Any:
        params = await _body(request)
        address = choose(str(params.get("model", "")))

        async def relay() -> AsyncIterator[bytes]:
            if not address:
                yield frame(
                    {"text": f"no worker serves model {params.get('model')!r}",
                     "error_code": int(ErrorCode.CONTROLLER_NO_WORKER)}
                )
                return
            try:
                async with client.stream(
                    "POST", address + "/worker_generate_stream", json=params, timeout=None
                ) as r:
                    async for chunk in r.aiter_raw():
                        yield chunk
            except httpx.HTTPError as e:
                yield frame({"text": f"worker {address} failed: {e}",
                             "error_code": int(ErrorCode.CONTROLLER_WORKER_TIMEOUT)})

        return ClosingStreamingResponse(relay(), media_type="application/octet-stream")

    @app.get("/metrics")
    async def get_metrics() -> Any:
        return metrics_response(metrics.registry)

    @app.get("/test_connection")
    async def test_connection() -> Any:
        return "success"

    @app.get("/worker_table")
    async def worker_table() -> Any:
        """Everything an API server needs to route on its own (our addition)."""
        table = registry.table()
        table["dispatch_method"] = dispatch_method
        return table

    return app


def run(args: argparse.Namespace) -> None:
    from llmrelay.config import setup_logging
    from llmrelay.runtime import serve, warn_public_bind

    setup_logging(args.log_level)
    token = token_from(args.registration_token)
    warn_public_bind(args.host, "the controller", protected=bool(token))
    app = create_app(args.dispatch_method, args.heartbeat_interval, token)
    serve(app, args.host, args.port, args.log_level, args.ssl, args.shutdown_timeout)
