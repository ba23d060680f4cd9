"""The controller's registry when the NATS registry is used (`--registry`): the same questions
as `Registry` (registry.py), answered from the bucket, so `ControllerService` and the routes do
not know which one they have.

- `workers` mirrors every worker record of the bucket, whoever wrote it (registry/watch.py keeps
  the view, with leases counted on this controller's clock). Every controller sees the same
  table; none is special, and any of them answers `/worker_table`, `/list_models`,
  `/get_worker_address`, `llmrelay status`.
- A worker that registers over HTTP (a FastChat worker, or one of ours given
  `--controller-address` instead of `--registry`) is written into the bucket on its behalf:
  its record says `via` this controller and is renewed on each of its heartbeats, with the
  lease its own protocol needs (FastChat's 90 s expiry for FastChat workers). If this
  controller dies, the record lapses after that lease, and the worker's next heartbeat to a
  restarted controller (answered `exist: false`) registers it again, as without NATS.
- A worker that writes its own record (`--registry`) is only read here; a controller never
  takes over its record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from llmrelay.controller.registry import FASTCHAT_EXPIRATION, Registry, WorkerInfo
from llmrelay.protocol import DEFAULT_HEARTBEAT_INTERVAL
from llmrelay.registry.base import RegistryConfig
from llmrelay.registry.records import CONTROLLERS, WORKERS, key_of, worker_record
from llmrelay.registry.watch import BucketWatch

log = logging.getLogger("llmrelay.controller")


class BucketRegistry(Registry):
    """`Registry` over the NATS registry; see the module docstring."""

    def __init__(self, cfg: RegistryConfig, address: str, dispatch_method: str,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(heartbeat_interval, clock)
        self.address = address
        self.sponsored: dict[str, WorkerInfo] = {}  # registered over HTTP with this controller
        self.watch = BucketWatch(
            cfg, CONTROLLERS, address, f"controller {address}", on_change=self.mirror,
            extra=lambda: {"dispatch_method": dispatch_method,
                           "heartbeat_interval": heartbeat_interval},
            clock=clock)
        self._view_version = -1
        self._writes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.watch.start()

    async def aclose(self) -> None:
        if self._writes:
            await asyncio.wait(self._writes, timeout=2.0)
        await self.watch.aclose()

    # ---- the bucket's view -> `workers` ---------------------------------------------------------

    def mirror(self) -> None:
        """Rebuild `workers` from the view (called on every change of it)."""
        view = self.watch.view
        workers: dict[str, WorkerInfo] = {}
        for e in view.workers():
            workers[e["name"]] = WorkerInfo(
                name=e["name"], model_names=list(e["model_names"]), speed=float(e["speed"]),
                queue_length=int(e["queue_length"]), check_heart_beat=e["check_heart_beat"],
                multimodal=e["multimodal"], last_heart_beat=e["last_heart_beat"],
                registered_at=float(e["registered_at"] or 0), status=dict(e["status"]))
        for name, info in self.sponsored.items():  # ours, before the bucket echoes them
            workers.setdefault(name, info)
        if view.version != self._view_version or set(workers) != set(self.workers):
            self._view_version = view.version
            self.version += 1
        self.workers = workers

    # ---- writes on behalf of HTTP-registered workers -------------------------------------------

    def _lease(self, info: WorkerInfo) -> float:
        return max(self.expiration, FASTCHAT_EXPIRATION) if info.is_fastchat else self.expiration

    def _write(self, coro: Any, what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as e:  # renewed at the worker's next heartbeat
                log.warning("could not write %s into the registry (%s: %s); retried at its "
                            "next heartbeat", what, type(e).__name__, e)

        task = asyncio.get_running_loop().create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, info: WorkerInfo) -> None:
        bucket = self.watch.bucket
        if bucket is None:
            raise ConnectionError("not connected to the registry yet")
        lease = self._lease(info)
        record = worker_record(
            info.name, {**info.status, "queue_length": info.queue_length},
            heartbeat_interval=self.heartbeat_interval, registered_at=info.registered_at,
            lease=lease, check_heart_beat=info.check_heart_beat, multimodal=info.multimodal,
            via=self.address)
        await bucket.put(key_of(WORKERS, info.name), record,
                         lease if info.check_heart_beat else None)

    async def _delete(self, name: str) -> None:
        if self.watch.bucket is None:
            raise ConnectionError("not connected to the registry yet")
        await self.watch.bucket.delete(key_of(WORKERS, name))

    def _self_published(self, name: str) -> bool:
        """A worker that writes its own record (`--registry`), not one of ours."""
        record = self.watch.view.records.get(key_of(WORKERS, name))
        return record is not None and not record.get("via") and name not in self.sponsored

    def register(self, name: str, status: dict[str, Any], check_heart_beat: bool = True,
                 multimodal: bool = False) -> WorkerInfo:
        if self._self_published(name):  # /refresh_all_workers: read it, do not take it over
            info = self.workers[name]
            info.status.update(status)
            return info
        info = super().register(name, status, check_heart_beat, multimodal)
        self.sponsored[name] = info
        self._write(self._put(info), f"worker {name}")
        return info

    def heartbeat(self, name: str, queue_length: int, status: dict[str, Any] | None = None) -> bool:
        info = self.sponsored.get(name)
        if info is None:
            return False  # unknown here: the worker registers again (with this controller)
        info.queue_length = int(queue_length)
        info.last_heart_beat = self.clock()
        if status:
            info.status.update(status)
        self._write(self._put(info), f"worker {name}")
        return True

    def remove(self, name: str) -> bool:
        self.sponsored.pop(name, None)
        known = super().remove(name)
        if known or self.watch.view.records.get(key_of(WORKERS, name)) is not None:
            self._write(self._delete(name), f"the removal of worker {name}")
        return known

    def expire(self) -> list[str]:
        """Stop renewing (and withdraw) the HTTP-registered workers that went silent; workers
        that publish their own record lapse on their lease in the view."""
        now = self.clock()
        dead = [n for n, w in self.sponsored.items()
                if w.check_heart_beat and w.last_heart_beat < now - self._lease(w)]
        for name in dead:
            self.remove(name)
        return dead

    def table(self) -> dict[str, Any]:
        return {**super().table(), "warming_up": not self.watch.view.synced}
