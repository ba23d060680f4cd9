"""The host's HTTP face, thin over `HostService` (host.py).

Cluster endpoints (the registration token, like a worker's): `/worker_get_status` (what `up`
and the controller read), `POST /host/ensure` (an API server waits here for a model's load),
`POST /host/touch` (a client's keep_alive hint for a loaded model).

Admin endpoints, guarded by the admin key (`--admin-key` / LLMRELAY_ADMIN_KEY), separate from
the users' API keys and from the cluster token: `GET /admin/models` (states, estimates, memory
in use, the budget), `POST /admin/load`, `POST /admin/unload`, `POST /admin/pin`, `POST
/admin/unpin`. A host without an admin key refuses them all.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmrelay.ondemand.host import HostService
from llmrelay.ondemand.policy import Refusal
from llmrelay.protocol import error_body, loads
from llmrelay.runtime import ClientGone, until_gone
from llmrelay.security import TokenGuard

ADMIN_PATHS = frozenset({"/admin/models", "/admin/load", "/admin/unload", "/admin/pin",
                         "/admin/unpin"})


def error(status: int, message: str, code: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_body(message, kind, code=code), status_code=status, headers=headers)


def refused(r: Refusal) -> JSONResponse:
    return error(r.status, r.message, r.code, r.retry_after)


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def create_app(service: HostService, token: str | None, admin_key: str | None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import asyncio

        loop = asyncio.get_running_loop()
        app.state.on_exit_signal = lambda: loop.call_soon_threadsafe(service.begin_shutdown)
        await service.start()
        yield
        await service.aclose()

    app = FastAPI(title="llmrelay host", lifespan=lifespan)
    app.add_middleware(TokenGuard, token=token,
                       open_paths=ADMIN_PATHS | frozenset({"/test_connection"}))

    def admin(request: Request) -> JSONResponse | None:
        """None when the request carries the admin key; the refusal otherwise."""
        if not admin_key:
            return error(403, "The admin endpoints of this host are off: start it with "
                         "--admin-key (or LLMRELAY_ADMIN_KEY).", "admin_disabled")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return error(401, "This endpoint needs the host's admin key (Authorization: Bearer "
                         "<admin key>); users' API keys are not admin keys.", "invalid_admin_key")
        if not hmac.compare_digest(given.strip().encode(), admin_key.encode()):
            return error(401, "Incorrect admin key.", "invalid_admin_key")
        return None

    def model_of(body: dict[str, Any]) -> str | JSONResponse:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "Give the model's name as 'model'.", "invalid_value")
        return model

    @app.get("/test_connection")
    async def test_connection() -> Any:
        return "success"

    @app.api_route("/worker_get_status", methods=["GET", "POST"])
    async def worker_get_status() -> Any:
        return service.status()

    @app.post("/host/ensure")
    async def ensure(request: Request) -> Any:
        body = await _body(request)
        model = model_of(body)
        if isinstance(model, JSONResponse):
            return model
        try:
            return await until_gone(request.receive, service.ensure(model, body.get("keep_alive")))
        except Refusal as r:
            return refused(r)
        except ClientGone:  # the API server's waiters all left: the load was let go
            return error(499, "The caller left.", "client_gone")

    @app.post("/host/touch")
    async def touch(request: Request) -> Any:
        body = await _body(request)
        model = model_of(body)
        if isinstance(model, JSONResponse):
            return model
        try:
            service.touch(model, body.get("keep_alive"))
        except Refusal as r:
            return refused(r)
        return {"model": model}

    @app.get("/admin/models")
    async def admin_models(request: Request) -> Any:
        return admin(request) or service.listing()

    async def admin_request(request: Request) -> tuple[dict[str, Any], str] | JSONResponse:
        """An admin route's body and model, or the refusal to answer (key, body, model)."""
        denied = admin(request)
        if denied is not None:
            return denied
        body = await _body(request)
        model = model_of(body)
        return model if isinstance(model, JSONResponse) else (body, model)

    @app.post("/admin/load")
    async def admin_load(request: Request) -> Any:
        asked = await admin_request(request)
        if isinstance(asked, JSONResponse):
            return asked
        body, model = asked
        try:
            if not body.get("wait", True):
                if service.begin(model, admin=True) is not None:
                    service.end(model, admin=True)  # the load goes on without anyone waiting
                return {"success": True, "model": model,
                        "state": service.pool.get(model).state}
            return {"success": True, **await until_gone(
                request.receive, service.ensure(model, admin=True))}
        except Refusal as r:
            return refused(r)
        except ClientGone:
            return error(499, "The caller left (the load goes on).", "client_gone")

    @app.post("/admin/unload")
    async def admin_unload(request: Request) -> Any:
        asked = await admin_request(request)
        if isinstance(asked, JSONResponse):
            return asked
        _, model = asked
        try:
            return {"success": True, **await service.unload(model)}
        except Refusal as r:
            return refused(r)

    async def pin(request: Request, on: bool) -> Any:
        asked = await admin_request(request)
        if isinstance(asked, JSONResponse):
            return asked
        _, model = asked
        try:
            return {"success": True, **service.pin(model, on)}
        except Refusal as r:
            return refused(r)

    @app.post("/admin/pin")
    async def admin_pin(request: Request) -> Any:
        return await pin(request, True)

    @app.post("/admin/unpin")
    async def admin_unpin(request: Request) -> Any:
        return await pin(request, False)

    return app
