"""Per-key limits, counted at the API server: requests and tokens per minute, tokens per day,
requests at once. Plain Python with an injectable clock.

Windows slide: a request counts for the 60 seconds after it arrived, its tokens (prompt +
completion, known when it ends) for the 60 seconds, or the day, after it ended. A request is
refused (429) when its key is at a limit, with the seconds until the window frees enough
(`Retry-After`) and the limit's name. Token limits are checked before a request runs, since its
size is known only after: a key under its limit may finish one request past it, then waits.

The counters live in this process (`Limiter`, behind the small `LimitStore` interface the API
server uses). Several API servers behind a load balancer each count on their own, so a key
gets its limits once per server; sharing them needs another `LimitStore` over a store the
servers share (the NATS key-value registry, when it lands), with the same two calls.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmrelay.api.keys import Key

MINUTE = 60.0
DAY = 86400.0


@dataclass
class Refusal:
    """Why a key may not send a request now."""

    limit: str  # "requests", "tokens" or "concurrent"
    message: str
    retry_after: float  # seconds


@dataclass
class _Window:
    """Amounts over a sliding period, oldest first."""

    period: float
    items: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def expire(self, now: float) -> None:
        while self.items and self.items[0][0] <= now - self.period:
            self.total -= self.items.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        if amount:
            self.items.append((now, amount))
            self.total += amount

    def wait_for_room(self, now: float, limit: int, need: int = 1) -> float:
        """Seconds until the total leaves room for `need` more under `limit`."""
        excess = self.total + need - limit
        for t, amount in self.items:
            excess -= amount
            if excess <= 0:
                return max(0.0, t + self.period - now)
        return self.period


@dataclass
class _KeyState:
    requests: _Window
    tokens: _Window
    daily: _Window
    running: int = 0


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60)}s"


class Limiter:
    """The limits of every key in use (keys.py says what each key may do).

    `minute` and `day` are the windows' lengths in seconds; only tests shorten them (the API
    server's hidden `--limit-windows` flag)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, minute: float = MINUTE,
                 day: float = DAY) -> None:
        self.clock = clock
        self.minute = minute
        self.day = day
        self.state: dict[str, _KeyState] = {}

    def _state(self, name: str) -> _KeyState:
        s = self.state.get(name)
        if s is None:
            s = self.state[name] = _KeyState(_Window(self.minute), _Window(self.minute),
                                             _Window(self.day))
        return s

    def admit(self, key: Key) -> Refusal | None:
        """Count a request of `key` now, or say why it must wait."""
        if not key.limited:
            return None
        now = self.clock()
        s = self._state(key.name)
        for w in (s.requests, s.tokens, s.daily):
            w.expire(now)
        who = f"Rate limit reached for key '{key.name}'"
        if key.concurrent is not None and s.running >= key.concurrent:
            return Refusal("concurrent", f"{who} on requests at once: Limit {key.concurrent}, "
                           f"Running {s.running}. Please try again when one of them ends.", 1.0)
        if key.requests_per_minute is not None and s.requests.total >= key.requests_per_minute:
            wait = s.requests.wait_for_room(now, key.requests_per_minute)
            return Refusal("requests", f"{who} on requests per min (RPM): Limit "
                           f"{key.requests_per_minute}, Used {s.requests.total}, Requested 1. "
                           f"Please try again in {_seconds(wait)}.", wait)
        if key.tokens_per_minute is not None and s.tokens.total >= key.tokens_per_minute:
            wait = s.tokens.wait_for_room(now, key.tokens_per_minute)
            return Refusal("tokens", f"{who} on tokens per min (TPM): Limit "
                           f"{key.tokens_per_minute}, Used {s.tokens.total}. Please try again "
                           f"in {_seconds(wait)}.", wait)
        if key.tokens_per_day is not None and s.daily.total >= key.tokens_per_day:
            wait = s.daily.wait_for_room(now, key.tokens_per_day)
            return Refusal("tokens", f"{who} on tokens per day (TPD): Limit "
                           f"{key.tokens_per_day}, Used {s.daily.total}. Please try again in "
                           f"{_seconds(wait)}.", wait)
        s.requests.add(now, 1)
        s.running += 1
        return None

    def done(self, key: Key, tokens: int) -> None:
        """A request admitted by `admit` ended, having used `tokens` (prompt + completion)."""
        if not key.limited:
            return
        s = self._state(key.name)
        now = self.clock()
        s.running = max(0, s.running - 1)
        s.tokens.add(now, tokens)
        s.daily.add(now, tokens)

    def seed_daily(self, name: str, tokens: int, age: float) -> None:
        """Count `tokens` a key used `age` seconds ago in its daily window (the usage store's
        count of today, read at start, so a restart does not hand out a fresh day)."""
        if tokens > 0 and age < self.day:
            self._state(name).daily.add(self.clock() - max(0.0, age), tokens)


class LimitStore(Protocol):
    """Where the API server counts limits: the two calls it makes per request. `LocalLimits`
    counts in this process; one over a store shared by several API servers would implement the
    same two calls (see the module docstring)."""

    async def admit(self, key: Key) -> Refusal | None: ...

    async def done(self, key: Key, tokens: int) -> None: ...


class LocalLimits:
    """The counters in this process (a `Limiter`)."""

    def __init__(self, limiter: Limiter | None = None) -> None:
        self.limiter = limiter or Limiter()

    async def admit(self, key: Key) -> Refusal | None:
        return self.limiter.admit(key)

    async def done(self, key: Key, tokens: int) -> None:
        self.limiter.done(key, tokens)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
