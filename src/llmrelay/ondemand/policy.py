"""The host's decisions, as plain Python with an injectable clock: which declared model is in
which state, what a request for one gets, which load runs next, which idle model makes room
for it, when an idle model unloads. The host (host.py) carries the decisions out with real
processes and reports back (`started`, `loaded`, `failed`, `unloading`, `unloaded`,
`activity`); tests drive this class alone.

Rules:
- loads are queued first come, first served, one entry per model however many requests want it
  (they share it); an entry nobody waits for any more (every client left) is dropped;
- a load starts when the model's estimated memory fits in what the loaded, loading and
  unloading models leave of the budget; otherwise the least recently used idle models are
  unloaded, one at a time, until it fits: never a pinned one, never one with requests running
  or waiting, never one just loaded for requests that have not reached it yet (reserved);
  when idle models cannot make room, the load waits;
- a model that cannot fit even alone (or beside the pinned ones) is refused at once, with both
  figures;
- a load that fails is retried only after a back-off (1 s, 2 s, 4 s ... up to 30 s); requests
  meanwhile are answered with the cause;
- an idle model unloads after its `idle_unload` time, or after a client's `keep_alive` hint
  (capped by `keep_alive_max`, the admin's ceiling) when one was given;
- a pinned model (`pin = true` in the stack file, or an admin's `pin` at run time) is kept
  loaded: loaded (again) by itself, never evicted, never unloaded for being idle, deaf to
  `keep_alive`; only an admin's unload takes it down. Unpinned, it is an ordinary idle model
  again, its idle time counted from the unpin.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmrelay.ondemand.catalog import ModelSpec
from llmrelay.ondemand.estimate import Estimate
from llmrelay.ondemand.sizes import fmt_bytes, fmt_duration

UNLOADED, LOADING, LOADED, UNLOADING = "unloaded", "loading", "loaded", "unloading"
RESERVE_S = 10.0  # a model just loaded stays until its first request arrives, or this long
BACKOFF_MAX_S = 30.0


class Refusal(Exception):
    """What a request for a model gets instead of the model: HTTP status, message, code."""

    def __init__(self, status: int, message: str, code: str,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "code": self.code,
                "retry_after": self.retry_after}


@dataclass
class Entry:
    spec: ModelSpec
    estimate: Estimate | None  # None: the files could not be read (`error` says why)
    state: str = UNLOADED
    since: float = 0.0  # when it entered this state
    busy: int = 0  # requests running or waiting on its worker, as last seen
    requests: int = 0  # requests its worker has started since it loaded
    last_used: float = 0.0
    loads: int = 0
    evictions: int = 0
    failures: int = 0  # in a row
    error: str = ""
    retry_at: float = 0.0
    keep: float | None = None  # idle time from a client's keep_alive hint (capped)
    address: str = ""
    pid: int = 0
    wanted: int = 0  # requests (or API servers' loads, or admins) waiting for it
    requested: int = 0  # ... of which requests (not admins)
    reserve: bool = False  # loaded for requests: kept for the first one (see `reserved`)
    sticky: bool = False  # an admin asked for the load: it happens even if every client leaves
    held_down: bool = False  # an admin unloaded it: a pinned model is not reloaded by itself

    @property
    def need(self) -> int:
        return self.estimate.total if self.estimate is not None else 0

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Load:
    name: str


@dataclass(frozen=True)
class Evict:
    name: str


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Fail:
    name: str
    refusal: Refusal


@dataclass(frozen=True)
class Ready:
    name: str


Step = Load | Evict | Wait | Fail | Ready


@dataclass
class Pool:
    """Every declared model of one host, the load queue and the budget's arithmetic."""

    entries: dict[str, Entry]
    capacity: Callable[[], int]
    budget_text: Callable[[], str] = lambda: "the budget"
    clock: Callable[[], float] = time.time
    keep_alive_max: float | None = 3600.0  # the host's ceiling for clients' hints
    queue: list[str] = field(default_factory=list)

    # ---- questions ---------------------------------------------------------------------------

    def get(self, name: str) -> Entry:
        return self.entries[name]  # KeyError: not declared here

    def held(self) -> int:
        """Estimated bytes of the models loaded, loading or still unloading."""
        return sum(e.need for e in self.entries.values() if e.state != UNLOADED)

    def reserved(self, e: Entry) -> bool:
        """Just loaded for requests that have not reached it yet (an admin's load is not)."""
        return (e.state == LOADED and e.reserve and e.requests == 0
                and self.clock() - e.since < RESERVE_S)

    def evictable(self, e: Entry) -> bool:
        return (e.state == LOADED and not e.spec.pin and e.busy == 0 and e.wanted == 0
                and not self.reserved(e))

    def too_big(self, e: Entry) -> Refusal | None:
        """Why `e` can never load here as things stand (alone, or beside the pinned models)."""
        if e.estimate is None:
            return Refusal(503, f"Model '{e.name}' cannot be loaded: {e.error}", "model_load_failed")
        cap = self.capacity()
        pinned = [x for x in self.entries.values()
                  if x.spec.pin and x.state in (LOADED, LOADING) and x is not e]
        held = sum(x.need for x in pinned)
        if e.need <= cap - held:
            return None
        est = e.estimate
        advice = [f"raise --max-memory to at least {fmt_bytes(e.need + held)}"]
        ctx = est.context_that_fits(cap - held)
        if est.tokens and ctx:
            advice.append(f"set context_length = {ctx} for this model (the KV cache grows with it)")
        if est.sequences > 1 and est.tokens:
            advice.append("lower its limit_worker_concurrency (one KV cache per sequence)")
        if est.engine == "transformers":
            advice.append("load it with load_8bit = true or dtype = \"bfloat16\"")
        beside = (f", beside the pinned {', '.join(x.name for x in pinned)} "
                  f"({fmt_bytes(held)})") if held else ""
        return Refusal(
            503, f"Model '{e.name}' needs about {fmt_bytes(e.need)} ({est.describe()}) but "
            f"this host can give it {fmt_bytes(max(0, cap - held))} (budget: "
            f"{self.budget_text()}{beside}). To serve it: {'; or '.join(advice)}.",
            "model_too_large")

    # ---- a request wants a model -------------------------------------------------------------

    def want(self, name: str, admin: bool = False) -> bool:
        """True when the model is loaded now; False when the caller must wait for its load
        (queued, or loading). Raises Refusal (too big, failed recently, manual) or KeyError.
        Each False must be matched by one `release` when the caller stops waiting."""
        e = self.get(name)
        if e.state == LOADED:
            return True
        refusal = self.too_big(e)
        if refusal is not None:
            raise refusal
        now = self.clock()
        if not admin and e.failures and now < e.retry_at and e.state == UNLOADED:
            wait = e.retry_at - now
            raise Refusal(503, f"Model '{name}' failed to load: {e.error} (it is tried again "
                          f"in {math.ceil(wait)} s)", "model_load_failed", retry_after=wait)
        if not admin and e.spec.load == "manual" and e.state == UNLOADED:
            raise Refusal(400, f"Model '{name}' is not loaded, and it is loaded only when an "
                          f"admin asks for it (`llmrelay models load {name}`).",
                          "model_not_loaded")
        e.wanted += 1
        if admin:
            e.sticky = True
            e.held_down = False
        else:
            e.requested += 1
        if e.state != LOADING and name not in self.queue:
            self.queue.append(name)
        return False

    def release(self, name: str, admin: bool = False) -> None:
        """A caller of `want` stops waiting (served, refused, or gone). An entry nobody waits
        for any more leaves the queue, so a client that left costs no model its place."""
        e = self.get(name)
        e.wanted = max(0, e.wanted - 1)
        if not admin:
            e.requested = max(0, e.requested - 1)
        if e.wanted == 0 and not e.sticky and name in self.queue:
            self.queue.remove(name)

    # ---- the next thing to do ----------------------------------------------------------------

    def step(self) -> Step | None:
        """What to do for the head of the queue (None: nothing queued)."""
        while self.queue:
            name = self.queue[0]
            e = self.entries[name]
            if e.state in (LOADED, LOADING):
                self.queue.pop(0)
                if e.state == LOADED:
                    return Ready(name)
                continue
            if e.state == UNLOADING:
                return Wait(f"{name} is still unloading")
            refusal = self.too_big(e)
            if refusal is not None:
                self.queue.pop(0)
                e.sticky = False
                return Fail(name, refusal)
            free = self.capacity() - self.held()
            if e.need <= free:
                return Load(name)
            leaving = sum(x.need for x in self.entries.values() if x.state == UNLOADING)
            if e.need <= free + leaving:
                return Wait(f"{name} waits for memory being freed")
            victims = sorted((x for x in self.entries.values() if self.evictable(x)),
                             key=lambda x: x.last_used)
            room = free + leaving
            for v in victims:
                room += v.need
                if room >= e.need:
                    return Evict(victims[0].name)
            busy = [x.name for x in self.entries.values()
                    if x.state in (LOADED, LOADING) and not x.spec.pin and not self.evictable(x)]
            return Wait(f"{name} needs {fmt_bytes(e.need)}, {fmt_bytes(max(free, 0))} is free; "
                        f"waiting for {', '.join(busy) or 'memory'} to be idle")
        return None

    # ---- what happened -----------------------------------------------------------------------

    def _enter(self, e: Entry, state: str) -> None:
        e.state = state
        e.since = self.clock()

    def started(self, name: str) -> None:
        e = self.get(name)
        if name in self.queue:
            self.queue.remove(name)
        e.loads += 1
        self._enter(e, LOADING)

    def loaded(self, name: str, address: str, pid: int) -> None:
        e = self.get(name)
        self._enter(e, LOADED)
        e.address, e.pid = address, pid
        e.busy = e.requests = 0
        e.reserve = e.requested > 0
        e.last_used = self.clock()
        e.failures, e.error, e.sticky = 0, "", False

    def failed(self, name: str, cause: str) -> Refusal:
        """The load failed: back to unloaded, with a back-off before the next try."""
        e = self.get(name)
        self._enter(e, UNLOADED)
        self._failure(e, cause)
        e.sticky = False
        if name in self.queue:
            self.queue.remove(name)
        return Refusal(503, f"Model '{name}' failed to load: {cause}", "model_load_failed",
                       retry_after=e.retry_at - self.clock())

    def _failure(self, e: Entry, cause: str) -> None:
        e.failures += 1
        e.error = cause
        e.retry_at = self.clock() + min(2.0 ** (e.failures - 1), BACKOFF_MAX_S)
        e.address, e.pid = "", 0

    def unloading(self, name: str, evicted: bool = False) -> None:
        e = self.get(name)
        self._enter(e, UNLOADING)
        if evicted:
            e.evictions += 1

    def unloaded(self, name: str, crash: str | None = None) -> None:
        """Its process is gone: cleanly, or (`crash` says how) by itself."""
        e = self.get(name)
        self._enter(e, UNLOADED)
        e.busy = e.requests = 0
        e.keep = None
        e.address, e.pid = "", 0
        if crash:
            self._failure(e, crash)

    def activity(self, name: str, busy: int, requests: int, last_used: float) -> None:
        """What its worker said: requests open, requests started, when it was last used."""
        e = self.get(name)
        if e.state != LOADED:
            return
        e.busy, e.requests = busy, requests
        e.last_used = max(e.last_used, last_used)
        if busy:
            e.last_used = self.clock()

    def hint(self, name: str, keep_alive: float | None) -> None:
        """A client's keep_alive (seconds; None: forever), capped by the admin's ceiling: the
        model's idle time until the next hint or unload. A pinned model ignores it."""
        e = self.get(name)
        if e.spec.pin:
            return
        ceiling = e.spec.keep_alive_max if e.spec.keep_alive_max is not None \
            else self.keep_alive_max
        asked = math.inf if keep_alive is None else max(0.0, keep_alive)
        e.keep = min(asked, math.inf if ceiling is None else ceiling)
        e.last_used = max(e.last_used, self.clock())

    def idle_timeout(self, e: Entry) -> float | None:
        t = e.keep if e.keep is not None else e.spec.idle_unload
        return None if t is None or math.isinf(t) else t

    def idle(self) -> list[str]:
        """Loaded models unused for longer than their idle time (never a pinned one)."""
        now = self.clock()
        out = []
        for e in self.entries.values():
            t = self.idle_timeout(e)
            if t is not None and self.evictable(e) and now - e.last_used >= t:
                out.append(e.name)
        return out

    def pinned_missing(self) -> list[str]:
        """Pinned models to (re)load: not loaded, not queued, not held down by an admin, and
        past any back-off."""
        now = self.clock()
        return [e.name for e in self.entries.values()
                if e.spec.pin and e.state == UNLOADED and not e.held_down
                and e.name not in self.queue and now >= e.retry_at and e.estimate is not None]

    def hold_down(self, name: str) -> None:
        """An admin unloads it: a pinned model stays unloaded until asked for again."""
        e = self.get(name)
        e.held_down = True
        e.sticky = False
        if name in self.queue:
            self.queue.remove(name)

    def pin(self, name: str, on: bool = True) -> None:
        """An admin pins (or unpins) a model at run time. Pinning keeps it loaded (loads it if it
        is not, even after an admin's unload) and drops a client's keep_alive; it is refused
        (409) when the model cannot fit beside the models already pinned. Unpinning lets it go
        like any idle model, its idle time counted from now."""
        e = self.get(name)
        if e.spec.pin == on:
            return
        if on:
            refusal = self.too_big(e) if e.estimate is not None else None  # None: not fetched
            if refusal is not None:
                raise Refusal(409, f"Cannot pin: {refusal.message}", refusal.code)
            e.spec.pin = True
            e.keep = None
            e.held_down = False
        else:
            e.spec.pin = False
            e.last_used = max(e.last_used, self.clock())

    # ---- views -------------------------------------------------------------------------------

    def declared(self) -> list[dict[str, Any]]:
        """What the cluster sees of each model (in the host's registration)."""
        return [{"name": e.name, "state": e.state, "bytes": e.need, "pin": e.spec.pin,
                 "load": e.spec.load, "error": e.error[:300], "address": e.address}
                for e in self.entries.values()]

    def listing(self) -> list[dict[str, Any]]:
        """The admin's view of each model."""
        now = self.clock()
        out = []
        for e in self.entries.values():
            t = self.idle_timeout(e)
            out.append({
                "name": e.name, "state": e.state, "load": e.spec.load, "pin": e.spec.pin,
                "path": e.spec.path, "estimate_bytes": e.need,
                "estimate": e.estimate.describe() if e.estimate else None,
                "address": e.address or None, "pid": e.pid or None, "busy": e.busy,
                "idle_s": round(now - e.last_used, 1) if e.state == LOADED else None,
                "idle_unload": fmt_duration(t) if t is not None else "never",
                "loads": e.loads, "evictions": e.evictions, "error": e.error or None,
                "queued": e.name in self.queue, "waiting": e.wanted,
            })
        return out
