"""The model worker's HTTP face: FastChat's worker endpoints, each a thin route over
`WorkerService` (service.py), plus the worker's record in the registry: with its controllers
(lifecycle.py), or in the NATS registry with `--registry` (registry/member.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmrelay.metrics import metrics_response
from llmrelay.protocol import ErrorCode, error_frame, frame, loads
from llmrelay.registry.base import Membership, RegistryConfig
from llmrelay.registry.member import BucketMembership
from llmrelay.runtime import ClientGone, ClosingStreamingResponse, FastJSONResponse, until_gone
from llmrelay.security import TokenGuard, auth_headers
from llmrelay.worker import activity
from llmrelay.worker.engines.base import Engine, EngineError
from llmrelay.worker.lifecycle import ControllerLink
from llmrelay.worker.service import (
    WorkerService,
    WorkerSettings,
    check_text,
    engine_error_frame,
)
from llmrelay.worker.templates import ChatTemplateError

log = logging.getLogger("llmrelay.worker")

__all__ = ["WorkerSettings", "create_app"]


class Links:
    """This worker's registrations (with its controllers, or its record in the NATS registry),
    and leaving them at shutdown."""

    def __init__(self, service: WorkerService, registry: RegistryConfig | None = None) -> None:
        s = service.settings
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), headers=auth_headers(s.token))
        self.links: list[Membership] = []
        if s.register and registry is not None:
            self.links = [BucketMembership(registry, s.worker_address, service.status,
                                           s.heartbeat_interval)]
        elif s.register:
            self.links = [ControllerLink(self.client, c, s.worker_address, service.status,
                                         s.heartbeat_interval)
                          for c in s.controller_addresses]
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(link.run()) for link in self.links]

    async def leave(self) -> None:
        """Stop heartbeats and deregister, so no new work is routed here."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*(link.deregister() for link in self.links if link.registered))
        for link in self.links:
            link.registered = False

    async def aclose(self) -> None:
        await self.leave()
        await self.client.aclose()


def create_app(engine: Engine, settings: WorkerSettings,
               registry: RegistryConfig | None = None) -> FastAPI:
    service = WorkerService(engine, settings)
    links = Links(service, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def on_exit_signal() -> None:  # runs in the signal handler, before requests drain
            service.state.draining = True
            log.info("shutting down: deregistering, refusing new requests, finishing %d running",
                     service.state.queue_length)
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(links.leave()))

        app.state.on_exit_signal = on_exit_signal
        await engine.start()
        links.start()
        log.info("worker %s serving %s", settings.worker_address, ", ".join(settings.model_names))
        yield
        await links.aclose()
        # Here, not after uvicorn returns: on SIGTERM uvicorn re-raises the signal once it has
        # shut down, which ends the process before any code after serve() runs.
        await engine.aclose()
        log.info("engine %s closed", engine.name)

    app = FastAPI(title="llmrelay model worker", lifespan=lifespan)
    app.add_middleware(TokenGuard, token=settings.token)
    app.state.service = service
    activity.install(app, service.state)  # what a host managing this worker asks (on demand)

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            data = loads(raw)
        except ValueError as e:
            raise EngineError(f"the body is not valid JSON: {e}",
                              ErrorCode.VALIDATION_TYPE_ERROR) from e
        if not isinstance(data, dict):
            raise EngineError("the body must be a JSON object", ErrorCode.VALIDATION_TYPE_ERROR)
        check_text(raw, data)
        return data

    async def refused(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(engine_error_frame(e), status_code=400)

    app.add_exception_handler(EngineError, refused)
    app.add_exception_handler(ChatTemplateError, refused)

    @app.get("/metrics")
    async def get_metrics() -> Any:
        return metrics_response(service.metrics.registry)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Any:
        req, delta = service.parse(await request.body())

        async def body() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(service.frames(req, delta)) as frames:
                async for f in frames:
                    yield frame(f)

        return ClosingStreamingResponse(body(), media_type="application/octet-stream")

    @app.post("/worker_generate")
    async def worker_generate(request: Request) -> Any:
        req, delta = service.parse(await request.body())
        try:
            return FastJSONResponse(await until_gone(request.receive, service.answer(req, delta)))
        except ClientGone:  # the answer was cancelled, which stopped the engine
            return JSONResponse(error_frame("client disconnected", ErrorCode.INTERNAL_ERROR), 499)

    @app.api_route("/worker_get_status", methods=["GET", "POST"])
    async def worker_get_status() -> Any:
        return service.status()

    @app.post("/count_token")
    async def count_token(request: Request) -> Any:
        return await service.count_token(await body_of(request))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        return await service.tokenize(await body_of(request))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Any:
        return await service.detokenize(await body_of(request))

    @app.post("/model_details")
    async def model_details() -> Any:
        return service.model_details()

    @app.post("/worker_get_conv_template")
    async def worker_get_conv_template() -> Any:
        return await service.conv_template()

    @app.post("/worker_get_embeddings")
    async def worker_get_embeddings(request: Request) -> Any:
        return await service.embeddings(await body_of(request))

    return app
