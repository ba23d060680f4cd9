"""Dispatch policies: given the workers that serve a model, pick one.

Used by the controller (`/get_worker_address`) and by API servers, which pick from their own
copy of the table with the controller's method, so no request waits on the controller.
Unlike FastChat, `shortest_queue` breaks ties at random (FastChat always took the first worker,
issue #3484) and a zero speed never divides by zero.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

METHODS = ("lottery", "shortest_queue")


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


def pick(
    method: str,
    candidates: Sequence[Candidate],
    rng: random.Random | None = None,
    extra_load: dict[str, int] | None = None,
) -> Candidate | None:
    """Pick by the named method (`lottery` or `shortest_queue`)."""
    if method == "lottery":
        return lottery(candidates, rng)
    if method == "shortest_queue":
        return shortest_queue(candidates, rng, extra_load)
    raise ValueError(f"unknown dispatch method {method!r}; choose one of {', '.join(METHODS)}")
