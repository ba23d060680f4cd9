"""A request's model, loaded before the request goes on: asked of the host that declares it,
once per model however many requests wait (they share the one load), with a bounded number of
waiters per model (429 with Retry-After past it), and done when this server's table routes to
the new worker.

What the host answers is passed on: a refusal (too big for the budget, a failed load during its
back-off, a model loaded only by an admin) becomes the same status and message here, naming the
model and the cause. Plain asyncio with the pooled client of the API server; tests drive it with
a fake table and transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from llmrelay.api.errors import APIError
from llmrelay.api.table import WorkerTable
from llmrelay.ondemand.view import Declared, declared_models

log = logging.getLogger("llmrelay.api")

DEFAULT_MAX_WAITING = 64
MISSING: Any = object()


@dataclass
class Pending:
    model: str
    task: asyncio.Task[None]
    waiters: int = 0


class Loads:
    def __init__(self, table: WorkerTable, client: httpx.AsyncClient,
                 refresh: Callable[[], Awaitable[Any]], max_waiting: int = DEFAULT_MAX_WAITING,
                 registration_wait: float = 30.0) -> None:
        self.table = table
        self.client = client
        self.refresh = refresh  # re-read the worker table now
        self.max_waiting = max(1, max_waiting)
        self.registration_wait = registration_wait
        self.pending: dict[str, Pending] = {}
        self._source: Any = None
        self._declared: dict[str, Declared] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # ---- what the table says -------------------------------------------------------------------

    def declared(self) -> dict[str, Declared]:
        """Declared models (cached until the table changes)."""
        workers = self.table.workers
        if workers is not self._source:
            self._declared = declared_models((w.name, w.status, w.registered_at)
                                             for w in workers.values())
            self._source = workers
        return self._declared

    def routable(self, model: str, address: str | None = None) -> bool:
        """A worker of `model` (at `address`, if given) this server would send a request to."""
        return any(w.ready and w.name not in self.table.down and (address is None or
                                                                   w.name == address)
                   for w in self.table.serving(model))

    def elsewhere(self, model: str, d: Declared) -> bool:
        """Served by a worker that is not its host's (one always loaded): no load needed."""
        return any(w.ready and w.name != d.address and w.name not in self.table.down
                   for w in self.table.serving(model))

    # ---- a request's model ---------------------------------------------------------------------

    def quick(self, model: str, keep_alive: Any = MISSING, force: bool = False) -> bool:
        """True when the request need not wait: its model is not declared, or loaded and
        routable (a keep_alive hint is passed on to the host meanwhile)."""
        d = self.declared().get(model)
        if d is None or (not force and self.elsewhere(model, d)):
            return True
        if force or d.state != "loaded" or not self.routable(model):
            return False
        if keep_alive is not MISSING and keep_alive is not None:
            self._touch(d.host, model, keep_alive)
        return True

    async def ready(self, model: str, keep_alive: Any = MISSING, force: bool = False) -> None:
        """Return once `model` can be routed to (at once when it is loaded or not declared);
        APIError otherwise. `force`: ask its host even if the table shows a worker (a request
        there was just refused: it may be unloading)."""
        if self.quick(model, keep_alive, force):
            return
        d = self.declared()[model]
        hint = None if keep_alive is MISSING else keep_alive
        p = self.pending.get(model)
        if p is None:
            p = Pending(model, asyncio.create_task(self._load(d.host, model, hint)))
            self.pending[model] = p
            p.task.add_done_callback(lambda t, p=p: self._done(p))
        elif p.waiters >= self.max_waiting:
            raise APIError(429, f"{p.waiters} requests are already waiting for model '{model}' "
                           "to load; retry shortly.", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": "2"})
        elif hint is not None:
            self._touch(d.host, model, hint)
        p.waiters += 1
        try:
            await asyncio.shield(p.task)
        finally:
            p.waiters -= 1
            if p.waiters == 0 and not p.task.done():
                p.task.cancel()  # every client left: the host lets the load go if none wants it

    def _done(self, p: Pending) -> None:
        if self.pending.get(p.model) is p:
            del self.pending[p.model]
        if not p.task.cancelled():
            p.task.exception()  # retrieved (the waiters got it)

    async def _load(self, host: str, model: str, keep_alive: Any) -> None:
        body: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        log.info("model %s is not loaded: asking its host %s", model, host)
        try:
            r = await self.client.post(host + "/host/ensure", json=body, timeout=httpx.Timeout(
                connect=3.0, read=None, write=10.0, pool=10.0))
        except httpx.HTTPError as e:
            raise APIError(503, f"Model '{model}' is loaded on demand by the host at {host}, "
                           f"which cannot be reached ({type(e).__name__}). Try again shortly.",
                           type="server_error", headers={"Retry-After": "2"}) from None
        if r.status_code != 200:
            raise host_error(r, model)
        address = (r.json() or {}).get("address") or None
        # The worker registered as it started: this server's copy of the table may not show it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.registration_wait
        while not self.routable(model, address):
            if loop.time() > deadline:
                raise APIError(503, f"Model '{model}' was loaded at {address} but has not "
                               "appeared in the worker table; try again.", type="server_error",
                               headers={"Retry-After": "1"})
            await self.refresh()
            if not self.routable(model, address):
                await asyncio.sleep(0.05)
        log.info("model %s loaded at %s", model, address)

    def _touch(self, host: str, model: str, keep_alive: Any) -> None:
        async def send() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await self.client.post(host + "/host/touch",
                                       json={"model": model, "keep_alive": keep_alive})

        task = asyncio.create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def host_error(r: httpx.Response, model: str) -> APIError:
    """The host's refusal as this server's error (same status and message)."""
    try:
        err = r.json().get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    message = str(err.get("message") or f"The host could not load model '{model}' "
                  f"(HTTP {r.status_code}).")
    headers = {"Retry-After": r.headers["retry-after"]} if "retry-after" in r.headers else {}
    status = r.status_code if r.status_code in (400, 404, 429, 503) else 503
    return APIError(status, message, type="invalid_request_error" if status < 500 else
                    "server_error", param="model", code=err.get("code"), headers=headers)
