"""Records in the registry bucket, and one reader's view of them: pure state, injectable clock.

Keys are `workers.<id>`, `controllers.<id>` and `apis.<id>`, where <id> is the process's
address in URL-safe base64 (bucket keys allow only `[-/_=.a-zA-Z0-9]`). A value is a JSON
object that says its own `lease` in seconds: a worker's is EXPIRY_BEATS heartbeat intervals
(9 s by default), a FastChat worker registered through a controller keeps FastChat's expiry.

`RecordView` is what one reader (an API server, a controller, `llmrelay status`) knows: each
record with the time it was last put, on the reader's own clock, and the reader drops a record
that was not renewed within its lease itself: an expiry in the bucket is not always seen (by
max-age it leaves no trace in a watch; a marker can be lost across a leader change), and the
reader's clock is the one that it can trust. So the server's expiry marker is only a hint, and
the reader's lease decides; a withdrawal (a delete, at a worker's shutdown) counts at once.
While the reader cannot tell whether its watch delivers, nothing is dropped (as with a
controller that is down, the last table keeps serving), and on recovery every lease counts
from then (`resume()`), which gives each worker a whole lease to renew after a registry outage.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from llmrelay import __version__
from llmrelay.protocol import DEFAULT_HEARTBEAT_INTERVAL, EXPIRY_BEATS

log = logging.getLogger("llmrelay.registry")

WORKERS = "workers"
CONTROLLERS = "controllers"
APIS = "apis"
KINDS = (WORKERS, CONTROLLERS, APIS)
MIN_LEASE = 1.0  # the bucket's per-key TTL is in whole seconds, at least one


def key_of(kind: str, address: str) -> str:
    """`workers.aHR0cDovLzEyNy4wLjAuMToyMTAwMg` for http://127.0.0.1:21002."""
    return f"{kind}.{base64.urlsafe_b64encode(address.encode()).decode().rstrip('=')}"


def split_key(key: str) -> tuple[str, str] | None:
    """(kind, address) of a key, or None for a key that is not one of ours."""
    kind, _, ident = key.partition(".")
    if kind not in KINDS or not ident:
        return None
    try:
        address = base64.b64decode(ident + "=" * (-len(ident) % 4), altchars=b"-_",
                                   validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (kind, address) if address else None


def lease_of(record: dict[str, Any]) -> float:
    try:
        return max(MIN_LEASE, float(record.get("lease") or 0))
    except (TypeError, ValueError):
        return MIN_LEASE


def worker_record(name: str, status: dict[str, Any], heartbeat_interval: float,
                  registered_at: float, lease: float | None = None,
                  check_heart_beat: bool = True, multimodal: bool = False,
                  via: str | None = None, now: float | None = None) -> dict[str, Any]:
    """A worker's record from its status (`model_names`, `speed`, `queue_length`, ...).

    `via`: the controller that registered it on its behalf (a FastChat worker), else None."""
    return {
        "name": name,
        "model_names": [str(m) for m in status.get("model_names") or []],
        "speed": float(status.get("speed", 1) or 0),
        "queue_length": int(status.get("queue_length", 0) or 0),
        "check_heart_beat": check_heart_beat,
        "multimodal": multimodal,
        "registered_at": registered_at,
        "sent_at": time.time() if now is None else now,
        "heartbeat_interval": heartbeat_interval,
        "lease": max(MIN_LEASE, lease if lease is not None else heartbeat_interval * EXPIRY_BEATS),
        "via": via,
        "status": dict(status),
    }


def presence_record(kind: str, address: str, lease: float, started: float,
                    **extra: Any) -> dict[str, Any]:
    """A controller's or API server's small record: who it is, where, since when."""
    return {"kind": kind, "address": address, "host": socket.gethostname(), "pid": os.getpid(),
            "version": __version__, "started": started, "sent_at": time.time(),
            "lease": max(MIN_LEASE, lease), **extra}


def _valid(kind: str, record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    if kind == WORKERS:
        names = record.get("model_names")
        return isinstance(record.get("name"), str) and isinstance(names, list) \
            and all(isinstance(n, str) for n in names)
    return isinstance(record.get("address"), str)


class RecordView:
    """The bucket's records as one reader last saw them; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.records: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}  # key -> when last put, on this reader's clock
        self.version = 0  # bumped whenever the set of workers changes
        self.synced = False  # a whole bucket has been loaded at least once

    def put(self, key: str, record: Any) -> bool:
        """A record was put (a registration or a renewal). True if the worker table changed."""
        where = split_key(key)
        if where is None or not _valid(where[0], record):
            log.debug("ignoring a malformed registry record under %r", key)
            return False
        new = key not in self.records
        self.records[key] = record
        self.seen[key] = self.clock()
        if new and where[0] == WORKERS:
            self.version += 1
        return where[0] == WORKERS or new

    def delete(self, key: str) -> bool:
        """A record was withdrawn (deleted at a worker's shutdown). True if it was known."""
        self.seen.pop(key, None)
        if self.records.pop(key, None) is None:
            return False
        if key.startswith(WORKERS + "."):
            self.version += 1
        return True

    def replace(self, entries: dict[str, Any]) -> None:
        """A fresh watch's first values: these records, each renewed now. A record the reader
        had and the bucket no longer holds is not renewed: it goes when its lease ends here."""
        for key, record in entries.items():
            self.put(key, record)
        self.synced = True

    def expire(self) -> list[str]:
        """Drop the records not renewed within their lease; returns their keys."""
        now = self.clock()
        dead = [k for k, r in self.records.items()
                if (r.get("check_heart_beat", True) is not False)
                and now - self.seen.get(k, now) > lease_of(r)]
        for key in dead:
            self.delete(key)
        return dead

    def resume(self) -> None:
        """The watch was not known to deliver for a while: count every lease from now."""
        now = self.clock()
        for key in self.seen:
            self.seen[key] = max(self.seen[key], now)

    # ---- questions ---------------------------------------------------------------------------

    def of_kind(self, kind: str) -> list[tuple[str, dict[str, Any], float]]:
        """(address, record, seconds since last renewed) of each record of one kind."""
        now = self.clock()
        out = []
        for key, record in self.records.items():
            where = split_key(key)
            if where is not None and where[0] == kind:
                out.append((where[1], record, max(0.0, now - self.seen.get(key, now))))
        return sorted(out, key=lambda x: x[0])

    def workers(self) -> list[dict[str, Any]]:
        """The worker records as `/worker_table` entries; the last heartbeat is when this
        reader last saw the record renewed."""
        out = []
        for key, r in self.records.items():
            if not key.startswith(WORKERS + "."):
                continue
            out.append({
                "name": r["name"], "model_names": list(r["model_names"]),
                "speed": r.get("speed", 1), "queue_length": r.get("queue_length", 0),
                "check_heart_beat": r.get("check_heart_beat", True) is not False,
                "multimodal": bool(r.get("multimodal", False)),
                "last_heart_beat": self.seen.get(key, 0.0),
                "registered_at": r.get("registered_at", 0.0),
                "status": r.get("status") if isinstance(r.get("status"), dict) else {},
                "lease": lease_of(r), "via": r.get("via"),
            })
        return out

    def heartbeat_interval(self) -> float:
        """The shortest heartbeat interval our workers announce (FastChat's 45 s aside)."""
        ours = [float(r.get("heartbeat_interval") or 0) for k, r in self.records.items()
                if k.startswith(WORKERS + ".") and not r.get("via")]
        ours = [x for x in ours if x > 0]
        return min(ours) if ours else DEFAULT_HEARTBEAT_INTERVAL

    def dispatch_method(self) -> str | None:
        """The controllers' dispatch method (the first controller's, by address), if any."""
        for _, record, _ in self.of_kind(CONTROLLERS):
            if isinstance(record.get("dispatch_method"), str):
                return record["dispatch_method"]
        return None

    def table(self, dispatch_method: str | None = None) -> dict[str, Any]:
        """Everything as one `/worker_table` answer (what API servers apply)."""
        interval = self.heartbeat_interval()
        return {
            "version": self.version,
            "heartbeat_interval": interval,
            "expiration": interval * EXPIRY_BEATS,
            "now": self.clock(),
            "warming_up": not self.synced,
            "dispatch_method": dispatch_method or self.dispatch_method() or "shortest_queue",
            "workers": self.workers(),
        }
