"""Keeps the API server's worker table up to date: polls the controller(s)' `/worker_table`.

The table is read in the background, so a request never waits on the controller; when no
controller answers, the last table keeps serving. The poller has its own small pooled client:
the controllers are not the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from llmrelay.api.table import WorkerTable

log = logging.getLogger("llmrelay.api")


class ControllerFeed:
    """Reads `/worker_table` from the first controller that answers, every `refresh` seconds."""

    def __init__(self, table: WorkerTable, refresh: float = 1.0,
                 headers: dict[str, str] | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.table = table
        self.refresh = refresh
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(5.0), limits=httpx.Limits(max_connections=20),
            headers=headers or {})
        self._task: asyncio.Task[None] | None = None

    async def _get(self, controller: str) -> dict[str, Any]:
        r = await self.client.get(controller + "/worker_table", timeout=2.0)
        r.raise_for_status()
        data = r.json()
        if not isinstance(data, dict):
            raise ValueError("the worker table is not a JSON object")
        return data

    async def read(self) -> tuple[str, dict[str, Any]] | None:
        """(controller, its table) from the first controller that answers now, else None."""
        for c in self.table.controllers:
            try:
                return c, await self._get(c)
            except (httpx.HTTPError, ValueError):
                continue
        return None

    async def fetch_once(self) -> bool:
        """Apply the table of the first controller that answers with one; False (and the last
        table kept) if none did."""
        table = self.table
        last_error: Exception | None = None
        for c in table.controllers:
            try:
                table.apply(await self._get(c))
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                last_error = e
                continue
            if not table.controller_ok:
                log.info("reading the worker table from controller %s (%d workers)",
                         c, len(table.workers))
            table.controller_ok = True
            return True
        if table.controller_ok or not table.loaded:
            log.warning(
                "controller %s not reachable (%s); serving from the last worker table "
                "(%d workers), retrying every %.1f s",
                ", ".join(table.controllers), type(last_error).__name__, len(table.workers),
                self.refresh,
            )
        table.controller_ok = False
        return False

    async def run(self) -> None:
        while True:
            await self.fetch_once()
            await asyncio.sleep(self.refresh)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()
