"""A worker's life with its controllers: register, heartbeat, re-register, deregister.

Start order does not matter: registration retries with backoff while a controller is
unreachable (saying so each time), and a heartbeat answered `exist: false` (the controller
restarted and forgot us) triggers a new registration. Several controllers may be listed (a hot
standby); each gets its own loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger("llmrelay.worker")


class ControllerLink:
    """Keeps this worker registered with one controller."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        controller: str,
        worker_address: str,
        status: Callable[[], dict[str, Any]],
        heartbeat_interval: float,
    ) -> None:
        self.client = client
        self.controller = controller.rstrip("/")
        self.worker_address = worker_address
        self.status = status
        self.interval = heartbeat_interval
        self.registered = False

    async def register(self) -> None:
        r = await self.client.post(
            self.controller + "/register_worker",
            json={
                "worker_name": self.worker_address,
                "check_heart_beat": True,
                "worker_status": self.status(),
                "multimodal": False,
            },
        )
        if r.status_code != 200:
            raise httpx.HTTPStatusError(
                f"{r.status_code} {r.text[:200]}", request=r.request, response=r
            )
        self.registered = True
        log.info("registered %s with controller %s", self.worker_address, self.controller)

    async def register_until_done(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.register()
                return
            except httpx.HTTPStatusError as e:
                log.error("controller %s refused registration: %s; retrying in %.0f s",
                          self.controller, e, max(delay, 1))
            except httpx.HTTPError as e:
                log.warning(
                    "controller at %s not reachable (%s), retrying in %.1f s",
                    self.controller, type(e).__name__, delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.interval, 2.0))

    async def heartbeat(self) -> None:
        status = self.status()
        r = await self.client.post(
            self.controller + "/receive_heart_beat",
            json={"worker_name": self.worker_address, "queue_length": status["queue_length"],
                  "worker_status": status},
        )
        r.raise_for_status()
        if not r.json().get("exist", False):
            log.warning("controller %s forgot this worker (restarted?); registering again",
                        self.controller)
            self.registered = False
            await self.register_until_done()

    async def run(self) -> None:
        await self.register_until_done()
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.heartbeat()
                if failing:
                    log.info("controller %s reachable again", self.controller)
                failing = False
            except (httpx.HTTPError, ValueError) as e:
                failing = True
                log.warning("heartbeat to controller %s failed (%s); retrying in %.1f s",
                            self.controller, type(e).__name__, self.interval)

    async def deregister(self) -> None:
        try:
            await self.client.post(
                self.controller + "/deregister_worker",
                json={"worker_name": self.worker_address},
                timeout=2.0,
            )
            log.info("deregistered from controller %s", self.controller)
        except httpx.HTTPError:
            pass
