"""What the controller does, as plain Python: FastChat's controller operations over the
`Registry` (registry.py) and the dispatch policy (dispatch.py), plus the few outbound calls
FastChat's protocol needs (a worker's status when a registration carries none,
`/refresh_all_workers`, the `/worker_generate_stream` proxy), made with one pooled async client.
`app.py` is the HTTP face over it; tests can drive it without a server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import httpx

from llmrelay.controller.registry import Registry
from llmrelay.dispatch import pick
from llmrelay.metrics import ControllerMetrics
from llmrelay.protocol import ErrorCode, error_frame, frame
from llmrelay.security import auth_headers

log = logging.getLogger("llmrelay.controller")


class Refused(Exception):
    """A request the controller refuses (400), with the reason."""


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


class ControllerService:
    """The registry, the dispatch policy, and the controller's calls to workers."""

    def __init__(self, dispatch_method: str = "shortest_queue", heartbeat_interval: float = 3.0,
                 token: str | None = None, registry: Registry | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.dispatch_method = dispatch_method
        self.registry = registry or Registry(heartbeat_interval=heartbeat_interval)
        self.metrics = ControllerMetrics(self.registry)
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(5.0), limits=httpx.Limits(max_connections=200),
            headers=auth_headers(token))

    # ---- membership --------------------------------------------------------------------------

    async def register(self, body: dict[str, Any]) -> None:
        name = body.get("worker_name")
        problem = valid_worker_url(name)
        if problem:
            raise Refused(problem)
        assert isinstance(name, str)
        status = body.get("worker_status")
        if not isinstance(status, dict):
            status = await self.fetch_status(name)
            if status is None:
                raise Refused(f"worker {name} did not answer /worker_get_status")
        if not isinstance(status.get("model_names"), list):
            raise Refused("worker_status.model_names must be a list of names")
        known = name in self.registry.workers
        self.metrics.registrations.labels("again" if known else "new").inc()
        self.registry.register(name, status, check_heart_beat=bool(body.get("check_heart_beat", True)),
                               multimodal=bool(body.get("multimodal", False)))
        log.info("%s worker %s serving %s", "re-registered" if known else "registered", name,
                 ", ".join(status["model_names"]))

    def deregister(self, body: dict[str, Any]) -> None:
        name = body.get("worker_name")
        if self.registry.remove(str(name)):
            self.metrics.deregistrations.inc()
            log.info("worker %s deregistered", name)

    def heartbeat(self, body: dict[str, Any]) -> bool:
        try:
            queue_length = int(body.get("queue_length", 0))
        except (TypeError, ValueError):
            raise Refused("queue_length must be an integer") from None
        extra = body.get("worker_status") if isinstance(body.get("worker_status"), dict) else None
        exist = self.registry.heartbeat(str(body.get("worker_name")), queue_length, extra)
        self.metrics.heartbeats.labels(str(exist).lower()).inc()
        return exist

    def expire(self) -> list[str]:
        """Drop the workers that stopped heartbeating (called periodically)."""
        dead = self.registry.expire()
        for name in dead:
            self.metrics.expirations.inc()
            log.warning("worker %s missed %d heartbeats; removed from the table", name,
                        int(self.registry.expiration / self.registry.heartbeat_interval))
        return dead

    async def sweep(self) -> None:
        """Expire silent workers every half heartbeat interval, forever."""
        while True:
            await asyncio.sleep(max(self.registry.heartbeat_interval / 2, 0.2))
            self.expire()

    async def fetch_status(self, url: str) -> dict[str, Any] | None:
        try:
            r = await self.client.post(url.rstrip("/") + "/worker_get_status", json={})
            r.raise_for_status()
            data = r.json()
            return data if isinstance(data, dict) and "model_names" in data else None
        except (httpx.HTTPError, ValueError) as e:
            log.warning("could not read the status of worker %s: %s", url, e)
            return None

    async def refresh_all(self) -> None:
        """Ask every worker its status again; drop those that do not answer."""
        old = list(self.registry.workers.values())
        statuses = await asyncio.gather(*(self.fetch_status(w.name) for w in old))
        for w, status in zip(old, statuses, strict=True):
            if status is None:
                self.registry.remove(w.name)
                log.warning("worker %s did not answer a refresh; removed", w.name)
            else:
                self.registry.register(w.name, status, w.check_heart_beat, w.multimodal)

    # ---- questions ---------------------------------------------------------------------------

    def choose(self, model: str) -> str:
        """A worker's address for `model` by the dispatch method ("" when none serves it)."""
        chosen = pick(self.dispatch_method, self.registry.workers_for(model))
        if chosen is None:
            return ""
        if self.dispatch_method in ("shortest_queue", "prefix"):
            # Count the request until the worker's next heartbeat says otherwise (as FastChat does).
            chosen.queue_length += 1
        return chosen.name

    def as_worker_status(self) -> dict[str, Any]:
        """The controller seen as one worker (FastChat's hierarchical mode)."""
        workers = list(self.registry.workers.values())
        return {"model_names": self.registry.list_models(),
                "speed": sum(w.speed for w in workers),
                "queue_length": sum(w.queue_length for w in workers)}

    def table(self) -> dict[str, Any]:
        """Everything an API server needs to route on its own (our addition)."""
        return {**self.registry.table(), "dispatch_method": self.dispatch_method}

    async def relay(self, params: dict[str, Any]) -> AsyncIterator[bytes]:
        """FastChat's `/worker_generate_stream` on the controller: a picked worker's stream."""
        address = self.choose(str(params.get("model", "")))
        if not address:
            yield frame(error_frame(f"no worker serves model {params.get('model')!r}",
                                    ErrorCode.CONTROLLER_NO_WORKER))
            return
        try:
            async with self.client.stream("POST", address + "/worker_generate_stream",
                                          json=params, timeout=None) as r:
                async for chunk in r.aiter_raw():
                    yield chunk
        except httpx.HTTPError as e:
            yield frame(error_frame(f"worker {address} failed: {e}",
                                    ErrorCode.CONTROLLER_WORKER_TIMEOUT))

    async def aclose(self) -> None:
        await self.client.aclose()
