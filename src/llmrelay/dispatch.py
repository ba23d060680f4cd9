"""Dispatch policies: given the workers that serve a model, pick one.

Used by the controller (`/get_worker_address`) and by API servers, which pick from their own
copy of the table with the controller's method, so no request waits on the controller.
Unlike FastChat, `shortest_queue` breaks ties at random (FastChat always took the first worker,
issue #3484) and a zero speed never divides by zero.

`prefix` is cache-aware: the API server remembers which worker served each conversation, and
sends the conversation's next turn to the same worker (whose engine still holds the prompt's
KV cache) unless that worker is overloaded; otherwise, and for requests that are not part of a
known conversation (or at the controller, which sees no conversations), it is `shortest_queue`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

METHODS = ("lottery", "shortest_queue", "prefix")
PREFIX_SLACK = 2  # `prefix` keeps a conversation's worker while it has at most this much more load


class Candidate(Protocol):
    name: str
    speed: float
    queue_length: int


def lottery(candidates: Sequence[Candidate], rng: random.Random | None = None) -> Candidate | None:
    """Random pick weighted by speed; None when no candidate has a positive speed."""
    rng = rng or random
    weights = [max(float(c.speed), 0.0) for c in candidates]
    if sum(weights) < 1e-4:
        return None
    return rng.choices(list(candidates), weights=weights, k=1)[0]


def shortest_queue(
    candidates: Sequence[Candidate],
    rng: random.Random | None = None,
    extra_load: dict[str, int] | None = None,
) -> Candidate | None:
    """The candidate with the least `queue_length / speed`, ties broken at random.

    `extra_load` adds load the caller knows about and the table does not yet (requests it sent
    since the last heartbeat).
    """
    rng = rng or random
    extra_load = extra_load or {}
    best: list[Candidate] = []
    best_score = float("inf")
    for c in candidates:
        speed = float(c.speed)
        if speed <= 0:
            continue
        score = (c.queue_length + extra_load.get(c.name, 0)) / speed
        if score < best_score - 1e-9:
            best, best_score = [c], score
        elif abs(score - best_score) <= 1e-9:
            best.append(c)
    if not best:
        return None
    return rng.choice(best)


def prefix(
    candidates: Sequence[Candidate],
    preferred: str | None,
    rng: random.Random | None = None,
    extra_load: dict[str, int] | None = None,
    slack: float = PREFIX_SLACK,
) -> Candidate | None:
    """`preferred` (the worker that served the conversation) unless it is overloaded: its
    `queue_length / speed` more than `slack` above the least loaded candidate's. Otherwise, or
    without a preferred worker, `shortest_queue`."""
    extra_load = extra_load or {}

    def load(c: Candidate) -> float:
        return (c.queue_length + extra_load.get(c.name, 0)) / float(c.speed)

    live = [c for c in candidates if float(c.speed) > 0]
    mine = next((c for c in live if c.name == preferred), None) if preferred else None
    if mine is not None and load(mine) <= min(load(c) for c in live) + slack:
        return mine
    return shortest_queue(candidates, rng, extra_load)


def conversation_keys(messages: Sequence[dict[str, Any]]) -> list[str]:
    """One key per message-list prefix (key i covers messages[: i + 1]), chained hashes."""
    keys = []
    h = hashlib.sha1()
    for m in messages:
        h.update(json.dumps([m.get("role"), m.get("content")], sort_keys=True,
                            default=str).encode())
        keys.append(h.copy().hexdigest())
    return keys


class Affinity:
    """Which worker served which conversation prefix; bounded, least recently used dropped."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.served: OrderedDict[str, str] = OrderedDict()

    def lookup(self, keys: Sequence[str]) -> str | None:
        """The worker that served the longest earlier prefix of this conversation."""
        for key in reversed(keys):
            worker = self.served.get(key)
            if worker is not None:
                self.served.move_to_end(key)
                return worker
        return None

    def remember(self, keys: Sequence[str], worker: str) -> None:
        if not keys:
            return
        self.served[keys[-1]] = worker
        self.served.move_to_end(keys[-1])
        while len(self.served) > self.capacity:
            self.served.popitem(last=False)


def pick(
    method: str,
    candidates: Sequence[Candidate],
    rng: random.Random | None = None,
    extra_load: dict[str, int] | None = None,
    preferred: str | None = None,
) -> Candidate | None:
    """Pick by the named method (`lottery`, `shortest_queue` or `prefix`)."""
    if method == "lottery":
        return lottery(candidates, rng)
    if method == "shortest_queue":
        return shortest_queue(candidates, rng, extra_load)
    if method == "prefix":
        return prefix(candidates, preferred, rng, extra_load)
    raise ValueError(f"unknown dispatch method {method!r}; choose one of {', '.join(METHODS)}")
