"""Keeps the API server's worker table up to date from the NATS registry (`--registry`): the
NATS implementation of `TableFeed` (registry/base.py), beside feed.py's controller poller.

The bucket is watched (registry/watch.py), and the whole view is applied to the table at every
change, pushed: a worker that registers, withdraws or lapses reaches every API server at once,
with no controller on the way and none on the request path. While the registry cannot be read
the last table keeps serving, as with a controller that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from llmrelay.api.table import WorkerTable
from llmrelay.registry.base import RegistryConfig
from llmrelay.registry.records import APIS
from llmrelay.registry.watch import BucketWatch

log = logging.getLogger("llmrelay.api")


class RegistryFeed:
    """The bucket's worker records, applied to `table` whenever they change."""

    def __init__(self, table: WorkerTable, cfg: RegistryConfig, address: str,
                 dispatch_method: str | None = None, first_wait: float = 5.0) -> None:
        self.table = table
        self.cfg = cfg
        self.dispatch_method = dispatch_method
        self.first_wait = first_wait
        table.controllers = [cfg.describe()]
        table.source = "registry"
        self.watch = BucketWatch(cfg, APIS, address, f"API server {address}",
                                 on_change=self.apply)
        self._started = False

    def apply(self) -> None:
        view = self.watch.view
        self.table.apply(view.table(self.dispatch_method))
        self.table.controller_ok = self.watch.healthy  # (called when it changes too)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.watch.start()

    async def fetch_once(self) -> bool:
        """Start watching and wait (a few seconds at most) for the first whole table."""
        self.start()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.watch.ready.wait(), self.first_wait)
        if not self.watch.ready.is_set():
            log.warning("the registry at %s has not answered yet; serving no workers until it "
                        "does", self.cfg.describe())
            return False
        self.apply()
        return True

    async def read(self) -> tuple[str, dict[str, Any]] | None:
        if not self.watch.view.synced:
            return None
        return f"registry {self.cfg.describe()}", self.watch.view.table(self.dispatch_method)

    async def aclose(self) -> None:
        await self.watch.aclose()
