"""The NATS side of the registry: connecting (credentials, TLS, reconnects), the bucket, puts.

The bucket is a JetStream key-value bucket (`llmrelay` unless `--registry-bucket` says
otherwise) with one value per key, replicated on 3 servers (R3) when the cluster has 3 nodes or
more, else on 1 (LLMRELAY_REGISTRY_REPLICAS overrides). Every put carries a per-key TTL, the
record's lease: the server removes a record nobody renews and leaves a marker that watchers see
(`limit_marker_ttl`). Whoever comes first creates the bucket; the others open it.

Connecting: the first connection is tried until it works, saying why each time (refused
credentials are named as such); after it, the client reconnects on its own, forever, to any
server of the cluster (those in `--registry` and those the cluster announces), and pings every
second so that a dead link is noticed within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from llmrelay.registry.base import RegistryConfig, RegistryError

log = logging.getLogger("llmrelay.registry")

REQUEST_TIMEOUT = 2.0  # a put or a bucket call; a leader election takes about as long
PING_INTERVAL = 1  # seconds; a dead connection is noticed after MAX_PINGS unanswered pings
MAX_PINGS = 3
RECONNECT_WAIT = 0.25
MARKER_TTL = 10.0  # how long the server keeps the marker of an expired record


def _nats() -> Any:
    try:
        import nats
    except ImportError as e:  # pragma: no cover - nats-py is a dependency
        raise RegistryError("the NATS registry needs the nats-py package: "
                            "pip install nats-py") from e
    return nats


def is_auth_error(e: BaseException) -> bool:
    text = str(e).lower()
    return "authorization" in text or "authentication" in text or "permissions" in text


def describe_error(cfg: RegistryConfig, e: BaseException) -> str:
    if is_auth_error(e):
        return (f"the registry at {cfg.describe()} refused this process's credentials ({e}); "
                "give --registry-user/--registry-password or --registry-token (or "
                "LLMRELAY_REGISTRY_USER / _PASSWORD / _TOKEN)")
    name = type(e).__name__
    if name == "NoServersError":
        return f"no NATS server of {cfg.describe()} answered"
    return f"the registry at {cfg.describe()} is not reachable ({name}: {e})"


Callback = Callable[[], Awaitable[None]]


async def connect(cfg: RegistryConfig, name: str, reconnected: Callback | None = None,
                  disconnected: Callback | None = None, timeout: float = 2.0) -> Any:
    """One connection attempt to each server of `cfg` (raises RegistryError on failure, at once
    when credentials are refused); once connected the client reconnects by itself forever.
    Returns the `nats.aio.client.Client`."""
    nats = _nats()
    last: list[BaseException] = []
    refused = asyncio.Event()

    async def on_error(e: BaseException) -> None:
        last.append(e)
        if is_auth_error(e):
            refused.set()
        log.debug("registry connection: %s: %s", type(e).__name__, e)

    async def on_reconnect() -> None:
        log.info("registry: reconnected to %s", _server_of(nc))
        if reconnected is not None:
            await reconnected()

    async def on_disconnect() -> None:
        if disconnected is not None:
            await disconnected()

    attempt = asyncio.ensure_future(nats.connect(
        **cfg.connect_options(), name=name, connect_timeout=timeout,
        reconnect_time_wait=RECONNECT_WAIT, max_reconnect_attempts=1,
        ping_interval=PING_INTERVAL, max_outstanding_pings=MAX_PINGS,
        error_cb=on_error, reconnected_cb=on_reconnect, disconnected_cb=on_disconnect))
    # nats-py retries refused credentials for as long as it is let: stop at the first refusal
    watch = asyncio.ensure_future(refused.wait())
    await asyncio.wait({attempt, watch}, timeout=timeout * (len(cfg.servers) + 1) + 1,
                       return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
        nc = attempt.result()
        nc.options["max_reconnect_attempts"] = -1  # from now on: reconnect forever
        return nc
    attempt.cancel()
    with contextlib.suppress(BaseException):
        await attempt
    cause = next((x for x in reversed(last) if is_auth_error(x)), None) or (
        last[-1] if last else asyncio.TimeoutError("no answer"))
    raise RegistryError(describe_error(cfg, cause))


def _server_of(nc: Any) -> str:
    url = nc.connected_url
    return f"{url.hostname}:{url.port}" if url is not None else "?"


def cluster_size(nc: Any) -> int:
    """Servers in the connected server's cluster (itself included), from its INFO."""
    info = getattr(nc, "_server_info", {}) or {}
    return max(1, len(info.get("connect_urls") or []))


async def connect_until_done(cfg: RegistryConfig, name: str, what: str,
                             reconnected: Callback | None = None,
                             disconnected: Callback | None = None) -> Any:
    """`connect`, retried with backoff (0.5 s doubling to 5 s) and a log line per failure."""
    delay = 0.5
    while True:
        try:
            nc = await connect(cfg, name, reconnected, disconnected)
            log.info("%s: connected to the registry at %s (server %s, %d in its cluster)", what,
                     cfg.describe(), _server_of(nc), cluster_size(nc))
            return nc
        except RegistryError as e:
            log.warning("%s: %s; retrying in %.1f s", what, e, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


class Bucket:
    """The registry's key-value bucket on one connection."""

    def __init__(self, nc: Any, cfg: RegistryConfig, kv: Any) -> None:
        self.nc = nc
        self.cfg = cfg
        self.kv = kv
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        self.prefix = f"$KV.{cfg.bucket}."

    @classmethod
    async def open(cls, nc: Any, cfg: RegistryConfig) -> Bucket:
        """Open the bucket, creating it when missing (raises while JetStream cannot answer,
        e.g. during a leader election)."""
        from nats.js.errors import BucketNotFoundError

        js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        try:
            kv = await js.key_value(cfg.bucket)
        except BucketNotFoundError:
            replicas = cfg.replicas or (3 if cluster_size(nc) >= 3 else 1)
            kv = await js.create_key_value(bucket=cfg.bucket, history=1, replicas=replicas,
                                           limit_marker_ttl=MARKER_TTL,
                                           description="llmrelay registry (leases)")
            log.info("created the registry bucket %r (R%d)", cfg.bucket, replicas)
        return cls(nc, cfg, kv)

    @classmethod
    async def open_until_done(cls, nc: Any, cfg: RegistryConfig, what: str) -> Bucket:
        delay = 0.25
        while True:
            try:
                return await cls.open(nc, cfg)
            except Exception as e:  # JetStream not ready (no meta leader yet), no permission
                if is_auth_error(e):
                    log.error("%s: %s", what, describe_error(cfg, e))
                else:
                    log.warning("%s: the registry bucket %r cannot be opened yet (%s: %s); "
                                "retrying in %.1f s", what, cfg.bucket, type(e).__name__, e,
                                delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def put(self, key: str, record: dict[str, Any], ttl: float | None) -> None:
        """Write a record; `ttl` (seconds, rounded up to whole ones) is its lease, None: none."""
        await self.js.publish(self.prefix + key, orjson.dumps(record),
                              msg_ttl=None if ttl is None else max(1, math.ceil(ttl)),
                              timeout=REQUEST_TIMEOUT)

    async def delete(self, key: str) -> None:
        """Withdraw a record now (watchers see a delete)."""
        await self.kv.delete(key)


def decode(value: bytes | None) -> Any:
    try:
        return orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        return None
