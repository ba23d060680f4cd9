"""A worker's record in the NATS registry: the NATS implementation of `Membership` (base.py).

At start the worker connects (retrying, saying why, until the registry answers: start order
does not matter), then puts its record every heartbeat interval with a per-key TTL of
EXPIRY_BEATS intervals, its lease: every put renews it, and the record carries the status of
the moment (queue, engine features, readiness). A put that fails (a leader election, a dead
link) is said once and retried at the next beat; the record then lapses on every reader after
its lease, and the next successful put brings the worker back. At shutdown the record is
deleted, which every reader sees at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from llmrelay.protocol import EXPIRY_BEATS
from llmrelay.registry.base import RegistryConfig
from llmrelay.registry.natskv import REQUEST_TIMEOUT, Bucket, connect_until_done
from llmrelay.registry.records import WORKERS, key_of, worker_record

log = logging.getLogger("llmrelay.worker")


class BucketMembership:
    """Keeps this worker's record in the registry bucket."""

    def __init__(self, cfg: RegistryConfig, worker_address: str,
                 status: Callable[[], dict[str, Any]], heartbeat_interval: float) -> None:
        self.cfg = cfg
        self.worker_address = worker_address
        self.status = status
        self.interval = heartbeat_interval
        self.lease = heartbeat_interval * EXPIRY_BEATS
        self.key = key_of(WORKERS, worker_address)
        self.registered = False
        self.registered_at = time.time()
        self.nc: Any = None
        self.bucket: Bucket | None = None
        self.controller = cfg.describe()  # where it registers, for messages

    def record(self) -> dict[str, Any]:
        return worker_record(self.worker_address, self.status(), self.interval,
                             self.registered_at, self.lease)

    async def publish(self) -> None:
        assert self.bucket is not None
        await self.bucket.put(self.key, self.record(), self.lease)

    async def run(self) -> None:
        what = f"worker {self.worker_address}"
        self.nc = await connect_until_done(self.cfg, f"llmrelay worker {self.worker_address}",
                                           what)
        self.bucket = await Bucket.open_until_done(self.nc, self.cfg, what)
        failing_since: float | None = None
        while True:
            try:
                await self.publish()
                if not self.registered:
                    log.info("registered %s in the registry at %s (lease %.0f s)",
                             self.worker_address, self.cfg.describe(), self.lease)
                elif failing_since is not None:
                    log.info("registry reachable again after %.1f s; record renewed",
                             time.monotonic() - failing_since)
                self.registered = True
                failing_since = None
            except Exception as e:  # timeouts, no leader, disconnected: retried next beat
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("renewing this worker's record in the registry failed (%s: %s);"
                                " retrying every %.1f s (readers drop it after %.0f s)",
                                type(e).__name__, e, self.interval, self.lease)
            await asyncio.sleep(self.interval)

    async def deregister(self) -> None:
        """Delete the record (every reader drops it at once) and close the connection."""
        if self.bucket is not None:
            try:
                await asyncio.wait_for(self.bucket.delete(self.key), REQUEST_TIMEOUT)
                log.info("withdrew %s from the registry", self.worker_address)
            except Exception as e:
                log.warning("could not withdraw from the registry (%s); readers drop this "
                            "worker after its lease", type(e).__name__)
        self.registered = False
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None
