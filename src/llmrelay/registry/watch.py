"""A live view of the registry bucket for API servers and controllers (the NATS implementation
of the reading side; records.py holds the state, natskv.py the connection).

`BucketWatch` watches every key of the bucket: the first values replace the view, each later
put or delete updates it, and `on_change` is called (coalesced over 10 ms) whenever the worker
table changed. It also publishes this process's presence record (`controllers.<id>` or
`apis.<id>`) every `interval` seconds, which doubles as a check that the watch delivers: the
record must come back through the watch. While it does not (the connection is down, the
bucket's leader is being elected, the server holding the watch died), the view is `held`:
nothing is dropped by lease, as a controller that is down leaves the last table serving; after
three intervals without it the watch is made anew, and on recovery every lease counts from
then. A reconnect also makes the watch anew. Records leave the view when withdrawn (a delete) or
when their lease ends on this process's clock (records.py says why not on the server's expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from llmrelay.registry.base import RegistryConfig
from llmrelay.registry.natskv import REQUEST_TIMEOUT, Bucket, connect_until_done, decode
from llmrelay.registry.records import WORKERS, RecordView, key_of, presence_record, split_key

log = logging.getLogger("llmrelay.registry")

PRESENCE_INTERVAL = 0.5  # seconds between presence puts (and watch checks)
PRESENCE_LEASE = 5.0
STALL_AFTER = 3  # intervals without our own record coming back: held, then watched anew


class BucketWatch:
    """The bucket's records, kept up to date; see the module docstring."""

    def __init__(self, cfg: RegistryConfig, kind: str, address: str, what: str,
                 extra: Callable[[], dict[str, Any]] | None = None,
                 on_change: Callable[[], None] | None = None,
                 interval: float = PRESENCE_INTERVAL, clock: Callable[[], float] = time.time
                 ) -> None:
        self.cfg = cfg
        self.kind = kind
        self.address = address
        self.what = what
        self.extra = extra or dict
        self.on_change = on_change
        self.interval = interval
        self.view = RecordView(clock)
        self.me = key_of(kind, address)
        self.started = time.time()
        self.nc: Any = None
        self.bucket: Bucket | None = None
        self.healthy = False  # our own record came back through the watch lately
        self.last_echo = float("-inf")  # monotonic
        self.last_watch = float("-inf")
        self._session: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_pending = False
        self._closing = False
        self.ready = asyncio.Event()  # the first whole bucket is in the view

    # ---- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run()))

    async def _run(self) -> None:
        self.nc = await connect_until_done(self.cfg, f"llmrelay {self.kind} {self.address}",
                                           self.what, reconnected=self._reconnected)
        self.bucket = await Bucket.open_until_done(self.nc, self.cfg, self.what)
        self._tasks += [asyncio.create_task(self._presence()), asyncio.create_task(self._expiry())]
        failing = False
        while not self._closing:
            self.last_watch = time.monotonic()
            self._session = asyncio.create_task(self._watch(self.bucket))
            await asyncio.wait({self._session})
            if not self._session.cancelled() and self._session.exception() is not None:
                e = self._session.exception()
                if not failing:  # once per outage, not every half second
                    log.warning("%s: the registry watch failed (%s: %s); trying again every "
                                "%.1f s", self.what, type(e).__name__, e, self.interval)
                failing = True
                await asyncio.sleep(self.interval)
            else:
                failing = False

    async def _reconnected(self) -> None:
        self.resync()

    def resync(self) -> None:
        """Make the watch anew (after a reconnect or a stall)."""
        if self._session is not None and not self._session.done():
            self._session.cancel()

    async def aclose(self) -> None:
        """Withdraw our presence record and close the connection."""
        self._closing = True
        for t in [*self._tasks, *([self._session] if self._session else [])]:
            t.cancel()
        for t in [*self._tasks, *([self._session] if self._session else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.bucket is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bucket.delete(self.me), REQUEST_TIMEOUT)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    # ---- the watch -----------------------------------------------------------------------------

    async def _watch(self, bucket: Bucket) -> None:
        watcher = await bucket.kv.watchall()
        try:
            first: dict[str, Any] = {}
            while True:
                entry = await watcher.updates(timeout=REQUEST_TIMEOUT * 2)
                if entry is None:  # the end of the values the bucket held
                    break
                if entry.operation is None:
                    first[entry.key] = decode(entry.value)
                else:
                    first.pop(entry.key, None)
                    if entry.operation == "DEL":
                        self.view.delete(entry.key)
            self.view.replace(first)  # (our own record there is old: it proves nothing)
            self.ready.set()
            self._changed()
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.key == self.me:
                    self._echo()
                if entry.operation is None:
                    changed = self.view.put(entry.key, decode(entry.value))
                elif entry.operation == "DEL":  # withdrawn; an expiry (PURGE) is left to leases
                    changed = self.view.delete(entry.key)
                    self._say_gone(entry.key, "withdrew its record")
                else:
                    changed = False
                if changed:
                    self._changed()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _echo(self) -> None:
        self.last_echo = time.monotonic()
        if not self.healthy:
            self.healthy = True
            self.view.resume()
            self._changed()
            log.info("%s: the registry watch delivers (%d workers)", self.what,
                     len(self.view.workers()))

    def _say_gone(self, key: str, why: str) -> None:
        where = split_key(key)
        if where is not None and where[0] == WORKERS:
            log.info("worker %s %s; removed from the table", where[1], why)

    def _changed(self) -> None:
        if self._flush_pending or self.on_change is None:
            return
        self._flush_pending = True
        asyncio.get_running_loop().call_later(0.01, self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self.on_change is not None:
            self.on_change()

    # ---- presence and leases -------------------------------------------------------------------

    async def _presence(self) -> None:
        assert self.bucket is not None
        while True:
            try:
                await self.bucket.put(self.me, presence_record(
                    self.kind, self.address, PRESENCE_LEASE, self.started, **self.extra()),
                    PRESENCE_LEASE)
            except Exception as e:  # no leader for now, disconnected: the check below says it
                log.debug("presence put failed: %s: %s", type(e).__name__, e)
            now = time.monotonic()
            stalled = now - self.last_echo > STALL_AFTER * self.interval
            if stalled and self.healthy:
                self.healthy = False
                self._changed()
                log.warning("%s: no news from the registry for %.1f s; keeping the last table "
                            "(%d workers) and watching anew", self.what, now - self.last_echo,
                            len(self.view.workers()))
            if stalled and now - self.last_watch > STALL_AFTER * self.interval:
                self.resync()
            await asyncio.sleep(self.interval)

    async def _expiry(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if not self.healthy:
                continue
            dead = self.view.expire()
            for key in dead:
                self._say_gone(key, "was not renewed within its lease")
            if any(k.startswith(WORKERS + ".") for k in dead):
                self._changed()
