"""Who runs next on a full worker: fair sharing between API keys, and priority classes.

A worker runs at most `--limit-worker-concurrency` requests; the others wait here. When a
place frees, the waiting request admitted is:
1. an `interactive` one before a `batch` one, unless the batch one has waited `aging` seconds
   (then it counts as interactive: batch work is never starved forever);
2. among those, one of the key that has received the least service so far: the Virtual Token
   Counter of "Fairness in Serving Large Language Models" (Sheng et al., OSDI 2024). Each key's
   counter grows by the tokens served to it, prompt tokens weighted `prompt_weight` and
   generated ones `completion_weight`; a key that starts waiting again has its counter lifted
   to the least counter of the keys already waiting, so idle time banks no credit;
3. then the oldest.
So a key sending 50 requests at once cannot starve a key sending one: the latter's counter
stays lowest. Requests without a key share the key "". Plain Python with an injectable clock;
the asyncio side only parks waiters on futures.

Without preemption, a key arriving at a worker whose places are all held by another key still
waits for one of them to end (a long generation: seconds). `reserve` places beyond the limit
close that gap: a request whose key has nothing running may take one at once (the engine holds
`limit + reserve` sequences; `--fair-reserve`). A key with a request running never uses them,
so one key alone, or requests without keys, never run more than `limit` at once; and a place
taken from the reserve goes back to it when any request ends (admission counts places, not
which request took which).

The worker bounds how many may wait (`--max-queue`). A full queue still takes a request that
would start at once in the reserve, and otherwise makes room by pushing out a waiter of the key
holding the most places (running + waiting) when that key holds at least two more than the
newcomer's key does (`make_room`; the newest of that key's waiters, never an interactive one
for a batch newcomer): a flooding key's own requests are the ones refused, not another key's
few. The pushed-out waiter's `acquire` raises `Full`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PRIORITIES = ("interactive", "batch")
DEFAULT_AGING = 30.0  # seconds after which a waiting batch request counts as interactive


class Full(Exception):
    """A waiter was pushed out of a full queue to make room for another key's request."""


@dataclass
class Waiter:
    key: str
    priority: str
    since: float
    order: int
    future: asyncio.Future[None] = field(repr=False)


class FairQueue:
    """Admission by priority class (with aging) and least virtual service per key."""

    def __init__(self, limit: int, prompt_weight: float = 1.0, completion_weight: float = 2.0,
                 aging: float = DEFAULT_AGING, clock: Callable[[], float] = time.monotonic,
                 reserve: int = 0) -> None:
        self.limit = max(1, limit)
        self.reserve = max(0, reserve)
        self.running_by_key: dict[str, int] = {}
        self.prompt_weight = prompt_weight
        self.completion_weight = completion_weight
        self.aging = aging
        self.clock = clock
        self.running = 0
        self.waiting: list[Waiter] = []
        self.counters: dict[str, float] = {}  # virtual service received, per key
        self._order = itertools.count()

    # ---- accounting ------------------------------------------------------------------------

    def charge(self, key: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Count service a key received (called as its requests are served)."""
        self.counters[key] = (self.counters.get(key, 0.0) + self.prompt_weight * prompt_tokens
                              + self.completion_weight * completion_tokens)

    def _lift(self, key: str) -> None:
        """A key that starts waiting gets no credit for the time it was idle."""
        if any(w.key == key for w in self.waiting):
            return
        others = [self.counters.get(w.key, 0.0) for w in self.waiting]
        if others:
            self.counters[key] = max(self.counters.get(key, 0.0), min(others))

    # ---- admission -------------------------------------------------------------------------

    def _rank(self, w: Waiter, now: float) -> tuple[int, float, int]:
        urgent = w.priority != "batch" or now - w.since >= self.aging
        return (0 if urgent else 1, self.counters.get(w.key, 0.0), w.order)

    def _guest(self, key: str) -> bool:
        """Whether a request of `key` may take a reserve place now."""
        return (self.running_by_key.get(key, 0) == 0
                and self.running < self.limit + self.reserve)

    def _start(self, key: str) -> None:
        self.running += 1
        self.running_by_key[key] = self.running_by_key.get(key, 0) + 1

    def held(self, key: str) -> int:
        """Places `key` holds: its requests running and waiting."""
        return self.running_by_key.get(key, 0) + sum(w.key == key for w in self.waiting)

    def make_room(self, key: str, priority: str = "interactive") -> bool:
        """On a full queue: whether a request of `key` may still come in, pushing out another
        key's waiter if needed (see the module docstring); False: refuse it."""
        if self.reserve and self._guest(key):
            return True  # it starts at once, in the reserve: it takes no waiting place
        mine = self.held(key)
        victims = [w for w in self.waiting if not w.future.done() and w.key != key
                   and (priority == "batch") <= (w.priority == "batch")]
        if not victims:
            return False
        heaviest = max({w.key for w in victims}, key=self.held)
        if self.held(heaviest) < mine + 2:
            return False
        now = self.clock()
        w = max((w for w in victims if w.key == heaviest), key=lambda w: self._rank(w, now))
        self.waiting.remove(w)
        w.future.set_exception(Full(f"pushed out by a request of a key holding fewer places "
                                    f"({mine} against {self.held(heaviest) + 1})"))
        return True

    async def acquire(self, key: str = "", priority: str = "interactive") -> None:
        """Wait for a place; cancellable (a cancelled waiter leaves the queue); raises `Full`
        when pushed out of a full queue (`make_room`)."""
        if (self.running < self.limit and not self.waiting) or (
                self.reserve and self._guest(key)):
            self._start(key)
            return
        self._lift(key)
        w = Waiter(key, priority, self.clock(), next(self._order),
                   asyncio.get_running_loop().create_future())
        self.waiting.append(w)
        try:
            await w.future
        except BaseException:
            if w in self.waiting:
                self.waiting.remove(w)
            elif (w.future.done() and not w.future.cancelled()
                  and w.future.exception() is None):
                self.release(key)  # admitted and cancelled at once: give the place on
            raise

    def release(self, key: str = "") -> None:
        """A running request of `key` ended: its place goes to the next waiter."""
        self.running -= 1
        n = self.running_by_key.get(key, 0) - 1
        if n > 0:
            self.running_by_key[key] = n
        else:
            self.running_by_key.pop(key, None)
        self._admit()

    def _admit(self) -> None:
        while self.running < self.limit:
            if not self._admit_one(list(self.waiting)):
                return
        while self.reserve:  # then keys with nothing running, into the reserve
            if not self._admit_one([w for w in self.waiting if self._guest(w.key)]):
                return

    def _admit_one(self, candidates: list[Waiter]) -> bool:
        """Admit the best of `candidates` (see the module docstring); False if none."""
        now = self.clock()
        while candidates:
            w = min(candidates, key=lambda w: self._rank(w, now))
            candidates.remove(w)
            self.waiting.remove(w)
            if w.future.done():  # cancelled while waiting
                continue
            self._start(w.key)
            w.future.set_result(None)
            return True
        return False
