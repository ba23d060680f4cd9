"""The controller's HTTP face: FastChat's controller endpoints plus `/worker_table`, each a thin
route over `ControllerService` (service.py). It never touches a model. With `--registry` its
registry is the NATS one (bucket.py) instead of its own state."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmrelay.controller.registry import Registry
from llmrelay.controller.service import ControllerService, Refused
from llmrelay.metrics import metrics_response
from llmrelay.protocol import error_body
from llmrelay.registry.base import RegistryConfig, RegistryError, public_address
from llmrelay.runtime import ClosingStreamingResponse
from llmrelay.security import TokenGuard, token_from

log = logging.getLogger("llmrelay.controller")


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def create_app(dispatch_method: str = "shortest_queue", heartbeat_interval: float = 3.0,
               token: str | None = None, registry_config: RegistryConfig | None = None,
               address: str = "") -> FastAPI:
    shared = None
    if registry_config is not None:
        from llmrelay.controller.bucket import BucketRegistry

        shared = BucketRegistry(registry_config, address, dispatch_method, heartbeat_interval)
    service = ControllerService(dispatch_method, heartbeat_interval, token, registry=shared)
    registry: Registry = service.registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if shared is not None:
            shared.start()
        task = asyncio.create_task(service.sweep())
        log.info("controller ready: dispatch %s, heartbeat every %.1f s, expiry after %.1f s%s",
                 dispatch_method, registry.heartbeat_interval, registry.expiration,
                 f", registry {registry_config.describe()}" if registry_config else "")
        yield
        task.cancel()
        await service.aclose()
        if shared is not None:
            await shared.aclose()

    app = FastAPI(title="llmrelay controller", lifespan=lifespan)
    app.add_middleware(TokenGuard, token=token, open_paths=frozenset({"/test_connection"}))
    app.state.service = service
    app.state.registry = registry

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> JSONResponse:
        return JSONResponse(error_body(str(e)), 400)

    @app.post("/register_worker")
    async def register_worker(request: Request) -> Any:
        await service.register(await _body(request))

    @app.post("/deregister_worker")
    async def deregister_worker(request: Request) -> Any:
        service.deregister(await _body(request))
        return {"removed": True}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> Any:
        return {"exist": service.heartbeat(await _body(request))}

    @app.api_route("/list_models", methods=["GET", "POST"])
    async def list_models() -> Any:
        return {"models": registry.list_models()}

    @app.api_route("/list_language_models", methods=["GET", "POST"])
    async def list_language_models() -> Any:
        return {"models": registry.list_models(multimodal=False)}

    @app.api_route("/list_multimodal_models", methods=["GET", "POST"])
    async def list_multimodal_models() -> Any:
        return {"models": registry.list_models(multimodal=True)}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> Any:
        return {"address": service.choose(str((await _body(request)).get("model", "")))}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> Any:
        await service.refresh_all()

    @app.post("/worker_get_status")
    async def worker_get_status() -> Any:
        return service.as_worker_status()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Any:
        return ClosingStreamingResponse(service.relay(await _body(request)),
                                        media_type="application/octet-stream")

    @app.get("/metrics")
    async def get_metrics() -> Any:
        return metrics_response(service.metrics.registry)

    @app.get("/test_connection")
    async def test_connection() -> Any:
        return "success"

    @app.get("/worker_table")
    async def worker_table() -> Any:
        return service.table()

    return app


def run(args: argparse.Namespace) -> None:
    from llmrelay.config import setup_logging
    from llmrelay.runtime import serve, warn_public_bind

    setup_logging(args.log_level)
    token = token_from(args.registration_token)
    warn_public_bind(args.host, "the controller", protected=bool(token))
    try:
        registry = RegistryConfig.from_args(args)
    except RegistryError as e:
        raise SystemExit(f"error: {e}") from e
    app = create_app(args.dispatch_method, args.heartbeat_interval, token, registry,
                     public_address(args.host, args.port, registry, args.ssl))
    serve(app, args.host, args.port, args.log_level, args.ssl, args.shutdown_timeout)
