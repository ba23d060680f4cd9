"""The controller's state: which workers exist, what they serve, when they last spoke.

Pure Python with an injectable clock, so tests drive it without HTTP. The state is soft: a
restarted controller rebuilds it from the workers' heartbeats (they re-register on `exist: false`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llmrelay.protocol import DEFAULT_HEARTBEAT_INTERVAL, EXPIRY_BEATS, worker_extensions

# FastChat's workers heartbeat every 45 s (FASTCHAT_WORKER_HEART_BEAT_INTERVAL); its controller
# expires them after 90 s. A FastChat worker (no llmrelay section in its status) keeps FastChat's
# expiry here, or it would be dropped between two of its heartbeats.
FASTCHAT_EXPIRATION = float(os.environ.get("FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION", "90"))


@dataclass
class WorkerInfo:
    """One registered worker, keyed by its address (FastChat's `worker_name`)."""

    name: str
    model_names: list[str]
    speed: float = 1.0
    queue_length: int = 0
    check_heart_beat: bool = True
    multimodal: bool = False
    last_heart_beat: float = 0.0
    registered_at: float = 0.0
    # The worker's whole status as it sent it (our workers add an `llmrelay` section).
    status: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_fastchat(self) -> bool:
        """A worker that speaks none of our extensions (FastChat's own workers)."""
        return not worker_extensions(self.status)


class Registry:
    """Register, heartbeat, expire; answers the list/table questions."""

    def __init__(
        self,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.expiration = heartbeat_interval * EXPIRY_BEATS
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self.started = clock()
        # Bumped on every change of membership, so API servers can tell a new table from an old one.
        self.version = 0

    def register(
        self,
        name: str,
        status: dict[str, Any],
        check_heart_beat: bool = True,
        multimodal: bool = False,
    ) -> WorkerInfo:
        """Store or replace a worker's entry from its status (`model_names`, `speed`, `queue_length`)."""
        now = self.clock()
        info = WorkerInfo(
            name=name,
            model_names=[str(m) for m in status.get("model_names") or []],
            speed=float(status.get("speed", 1) or 0),
            queue_length=int(status.get("queue_length", 0) or 0),
            check_heart_beat=check_heart_beat,
            multimodal=multimodal,
            last_heart_beat=now,
            registered_at=now,
            status=dict(status),
        )
        self.workers[name] = info
        self.version += 1
        return info

    def heartbeat(self, name: str, queue_length: int, status: dict[str, Any] | None = None) -> bool:
        """Record a heartbeat. False means "unknown worker": it must register again."""
        info = self.workers.get(name)
        if info is None:
            return False
        info.queue_length = int(queue_length)
        info.last_heart_beat = self.clock()
        if status:
            info.status.update(status)
        return True

    def remove(self, name: str) -> bool:
        removed = self.workers.pop(name, None) is not None
        if removed:
            self.version += 1
        return removed

    def expire(self) -> list[str]:
        """Drop workers silent for longer than the expiration; returns their names."""
        now = self.clock()
        dead = [
            n for n, w in self.workers.items() if w.check_heart_beat and w.last_heart_beat < now - (
                max(self.expiration, FASTCHAT_EXPIRATION) if w.is_fastchat else self.expiration)
        ]
        for name in dead:
            self.remove(name)
        return dead

    def list_models(self, multimodal: bool | None = None) -> list[str]:
        """Sorted union of model names, optionally filtered by the multimodal flag."""
        names: set[str] = set()
        for w in self.workers.values():
            if multimodal is None or w.multimodal == multimodal:
                names.update(w.model_names)
        return sorted(names)

    def workers_for(self, model: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if model in w.model_names]

    def table(self) -> dict[str, Any]:
        """The whole table, as API servers receive it."""
        now = self.clock()
        return {
            "version": self.version,
            "heartbeat_interval": self.heartbeat_interval,
            "expiration": self.expiration,
            "now": now,
            # Younger than one expiration period: workers may still be re-registering.
            "warming_up": now - self.started < self.expiration,
            "workers": [w.to_dict() for w in self.workers.values()],
        }
