"""Per-key limits, counted at the API server: requests and tokens per minute, tokens per day,
requests at once. Plain Python with an injectable clock.

Windows slide: a request counts for the 60 seconds after it arrived, its tokens (prompt +
completion, known when it ends) for the 60 seconds, or the day, after it ended. A request is
refused (429) when its key is at a limit, with the seconds until the window frees enough
(`Retry-After`) and the limit's name. Token limits are checked before a request runs, since its
size is known only after: a key under its limit may finish one request past it, then waits.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

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
    requests: _Window = field(default_factory=lambda: _Window(MINUTE))
    tokens: _Window = field(default_factory=lambda: _Window(MINUTE))
    daily: _Window = field(default_factory=lambda: _Window(DAY))
    running: int = 0


class Limiter:
    """The limits of every key in use (keys.py says what each key may do)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.state: dict[str, _KeyState] = {}

    def admit(self, key: Key) -> Refusal | None:
        """Count a request of `key` now, or say why it must wait."""
        if not key.limited:
            return None
        now = self.clock()
        s = self.state.setdefault(key.name, _KeyState())
        for w in (s.requests, s.tokens, s.daily):
            w.expire(now)
        if key.concurrent is not None and s.running >= key.concurrent:
            return Refusal("concurrent", f"This key may run {key.concurrent} requests at once "
                           "and has that many running; retry when one ends.", 1.0)
        if key.requests_per_minute is not None and s.requests.total >= key.requests_per_minute:
            wait = s.requests.wait_for_room(now, key.requests_per_minute)
            return Refusal("requests", f"Rate limit reached for this key: "
                           f"{key.requests_per_minute} requests per minute.", wait)
        if key.tokens_per_minute is not None and s.tokens.total >= key.tokens_per_minute:
            wait = s.tokens.wait_for_room(now, key.tokens_per_minute)
            return Refusal("tokens", f"Rate limit reached for this key: "
                           f"{key.tokens_per_minute} tokens per minute.", wait)
        if key.tokens_per_day is not None and s.daily.total >= key.tokens_per_day:
            wait = s.daily.wait_for_room(now, key.tokens_per_day)
            return Refusal("tokens", f"This key has used its {key.tokens_per_day} tokens per "
                           "day.", wait)
        s.requests.add(now, 1)
        s.running += 1
        return None

    def done(self, key: Key, tokens: int) -> None:
        """A request admitted by `admit` ended, having used `tokens` (prompt + completion)."""
        if not key.limited:
            return
        s = self.state.setdefault(key.name, _KeyState())
        now = self.clock()
        s.running = max(0, s.running - 1)
        s.tokens.add(now, tokens)
        s.daily.add(now, tokens)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
