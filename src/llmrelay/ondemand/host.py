"""The host: carries out the policy's decisions (policy.py) with real worker processes
(procs.py), and tells the cluster what it declares.

- It registers with the controller(s) like a worker, with no model names of its own and a
  `llmrelay.role = "host"` section listing its declared models and their states, so every API
  server sees them in the table it already reads (no new controller endpoint; a registry that
  carries worker statuses carries this too). A change of state is sent at once (an extra
  heartbeat), not at the next beat.
- `ensure(model)` is what an API server calls for a request's model: at once when loaded, else
  it joins the model's one load (the policy queues it) and returns when that load is done, or
  raises the Refusal every waiter gets.
- A scheduler task takes the policy's next step whenever something changes: start a load,
  drain and stop an idle model to make room (`/worker_drain_if_idle` first, so a model that
  just got a request is left alone), or wait. While it waits, and while a loaded model has an
  idle timer, it asks the workers how busy they are every `tick` seconds.
- A worker that exits by itself (a crash) takes only its model down; a pinned one is started
  again after the back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmrelay import __version__
from llmrelay.ondemand.catalog import ModelSpec, worker_args
from llmrelay.ondemand.estimate import Budget, EstimateError, estimate
from llmrelay.ondemand.fetching import Fetches
from llmrelay.ondemand.policy import (
    LOADED,
    UNLOADED,
    UNLOADING,
    Entry,
    Evict,
    Fail,
    Load,
    Pool,
    Ready,
    Refusal,
    Wait,
)
from llmrelay.ondemand.procs import LoadFailed, WorkerProc
from llmrelay.ondemand.sizes import fmt_bytes, fmt_duration, parse_duration
from llmrelay.security import TOKEN_ENV, auth_headers
from llmrelay.worker.lifecycle import ControllerLink
from llmrelay.worker.main import default_worker_address
from llmrelay.worker.managed import free_port

log = logging.getLogger("llmrelay.host")

ROLE = "host"


@dataclass
class HostSettings:
    address: str  # this host's URL, as the cluster reaches it
    bind_host: str = "127.0.0.1"  # where its workers listen
    controllers: list[str] = field(default_factory=list)
    token: str | None = None
    heartbeat_interval: float = 3.0
    max_memory: str = "0.8"
    keep_alive_max: float | None = 3600.0
    load_timeout: float = 600.0
    worker_log_dir: Path | None = None
    worker_shutdown: float = 30.0  # a worker's --shutdown-timeout: how long an unload may wait
    tick: float = 0.5
    gpu: bool | None = None  # None: a GPU budget where nvidia-smi answers


class HostService:
    def __init__(self, specs: list[ModelSpec], settings: HostSettings,
                 budget: Budget | None = None, echo: Callable[[str], None] | None = None) -> None:
        self.specs = specs
        self.settings = settings
        self.budget = budget or Budget(settings.max_memory, settings.gpu)
        entries = {s.name: Entry(s, None) for s in specs}
        self.pool = Pool(entries, self.budget.capacity, self.budget.describe,
                         keep_alive_max=settings.keep_alive_max)
        self.procs: dict[str, WorkerProc] = {}
        self.echo = echo
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(5.0),
                                        headers=auth_headers(settings.token))
        self.links = [ControllerLink(self.client, c, settings.address, self.status,
                                     settings.heartbeat_interval) for c in settings.controllers]
        self._outcomes: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._push_pending = False
        self._last_wait = ""
        self.closing = False
        self.fetches = Fetches(self.push)  # hub models not in the cache yet

    # ---- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._estimate_all)
        self._tasks = [asyncio.create_task(link.run()) for link in self.links]
        self._tasks.append(asyncio.create_task(self._schedule()))
        for e in self.pool.entries.values():
            if e.spec.pin and self.fetches.needed(e.spec):
                self._spawn(self._load_pinned(e.name))  # fetched first
        def size(e: Entry) -> str:
            if e.estimate:
                return fmt_bytes(e.need)
            return "on the hub, fetched when first wanted" if self.fetches.needed(e.spec) \
                else "unreadable"

        names = ", ".join(f"{e.name} ({size(e)}"
                          f"{', pinned' if e.spec.pin else ''})" for e in self.pool.entries.values())
        log.info("host %s declares %s; budget %s", self.settings.address, names or "no models",
                 self.budget.describe())

    def _estimate_all(self) -> None:
        for e in self.pool.entries.values():
            if self.fetches.needed(e.spec):
                continue  # estimated once fetched
            try:
                e.estimate = estimate(e.spec, self.budget.gpu)
            except (EstimateError, ValueError) as err:
                e.error = str(err)
                log.error("model %s cannot be estimated, so it cannot be loaded: %s", e.name, err)

    def begin_shutdown(self) -> None:
        """At the exit signal: refuse new loads, answer every waiting request."""
        self.closing = True
        for name in list(self._outcomes):
            self._resolve(name, Refusal(503, f"The host loading '{name}' is shutting down.",
                                        "host_shutting_down", retry_after=2))
        self._wake.set()

    async def aclose(self) -> None:
        self.begin_shutdown()
        for t in self._tasks:
            t.cancel()
        for t in list(self._background):
            t.cancel()
        procs = list(self.procs.items())
        for name, _ in procs:
            if self.pool.get(name).state != UNLOADED:
                self.pool.unloading(name)
        await asyncio.gather(*(p.stop(self.settings.worker_shutdown + 5) for _, p in procs),
                             return_exceptions=True)
        for link in self.links:
            if link.registered:
                await link.deregister()
        await self.client.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- what the cluster sees ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The host's registration: no model names (nothing routes to it), its declared models."""
        return {
            "model_names": [],
            "speed": 0,
            "queue_length": 0,
            "llmrelay": {
                "version": __version__, "role": ROLE, "extensions": [ROLE], "engine": ROLE,
                "ready": True, "declared": self._with_fetches(self.pool.declared()),
                "budget_bytes": self._capacity(), "held_bytes": self.pool.held(),
            },
        }

    def _with_fetches(self, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Models being fetched from the hub are `downloading`, with their progress."""
        for m in models:
            m.update(self.fetches.state(m["name"]) or {})
        return models

    def _capacity(self) -> int | None:
        try:
            return self.budget.capacity()
        except Exception:  # noqa: BLE001 - a status must not fail
            return None

    def push(self) -> None:
        """Send the new states to the controllers now (one extra heartbeat, coalesced)."""
        if self._push_pending:
            return
        self._push_pending = True

        async def beat() -> None:
            await asyncio.sleep(0)
            self._push_pending = False
            for link in self.links:
                if link.registered:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        await link.heartbeat()

        self._spawn(beat())

    def listing(self) -> dict[str, Any]:
        models = self._with_fetches(self.pool.listing())
        for m in models:
            proc = self.procs.get(m["name"])
            m["memory_bytes"] = rss(proc.pid) if proc is not None and proc.running else None
        cap = self._capacity()
        held = self.pool.held()
        return {"host": self.settings.address, "budget_bytes": cap, "budget": self.budget.describe(),
                "memory": self.budget.where, "held_bytes": held,
                "free_bytes": None if cap is None else cap - held, "queue": list(self.pool.queue),
                "models": models}

    # ---- requests ---------------------------------------------------------------------------------

    def _entry(self, name: str) -> Entry:
        try:
            return self.pool.get(name)
        except KeyError:
            raise Refusal(404, f"This host does not declare a model named '{name}'.",
                          "model_not_found") from None

    def begin(self, name: str, admin: bool = False) -> asyncio.Future[None] | None:
        """Want `name` loaded: None when it is (or when a hub model's fetch, then its load, was
        started for an admin), else the future of its load (then call `end` once done
        waiting). Raises the Refusal at once when it cannot be loaded now."""
        e = self._entry(name)
        if self.closing:
            raise Refusal(503, "This host is shutting down.", "host_shutting_down", 2)
        if self.fetches.needed(e.spec):
            self._spawn(self._load_pinned(name))
            return None
        if self.pool.want(name, admin):
            return None
        outcome = self._outcomes.get(name)
        if outcome is None or outcome.done():
            outcome = self._outcomes[name] = asyncio.get_running_loop().create_future()
        self._wake.set()
        self.push()
        return outcome

    def end(self, name: str, admin: bool = False) -> None:
        self.pool.release(name, admin)
        self._wake.set()

    async def ensure(self, name: str, keep_alive: Any = None, admin: bool = False) -> dict[str, Any]:
        """Return when `name` is loaded (at once if it is; a hub model is fetched first);
        Refusal otherwise."""
        await self._fetched(name, admin)
        outcome = self.begin(name, admin)
        if outcome is not None:
            try:
                await asyncio.shield(outcome)
            finally:
                self.end(name, admin)
        if keep_alive is not None:
            self.touch(name, keep_alive)
        e = self.pool.get(name)
        return {"model": name, "state": e.state, "address": e.address}

    async def _fetched(self, name: str, admin: bool) -> None:
        """A hub model's files in the cache and its estimate made (at once for any other)."""
        e = self._entry(name)
        if not self.fetches.needed(e.spec):
            return
        if self.closing:
            raise Refusal(503, "This host is shutting down.", "host_shutting_down", 2)
        if not admin and e.spec.load == "manual":
            raise Refusal(400, f"Model '{name}' is not loaded, and it is loaded only when an admin "
                          f"asks for it (`llmrelay models load {name}`).", "model_not_loaded")
        await self.fetches.ensure(e.spec)
        if e.estimate is None:
            try:
                e.estimate = await asyncio.to_thread(estimate, e.spec, self.budget.gpu)
                e.error = ""
            except (EstimateError, ValueError) as err:
                e.error = str(err)
                raise Refusal(503, f"Model '{name}' cannot be loaded: {err}",
                              "model_load_failed") from None
            self.push()

    def touch(self, name: str, keep_alive: Any) -> None:
        """A client's keep_alive hint (a duration; -1: as long as the admin allows)."""
        self._entry(name)
        try:
            seconds = parse_duration(keep_alive)
        except ValueError as err:
            raise Refusal(400, f"keep_alive: {err}", "invalid_value") from None
        self.pool.hint(name, seconds)

    def pin(self, name: str, on: bool = True) -> dict[str, Any]:
        """An admin's pin or unpin (policy.Pool.pin); the scheduler loads a pinned model that
        is not loaded. Until the host restarts: the stack file's `pin` is the one at start."""
        e = self._entry(name)
        self.pool.pin(name, on)
        if on and self.fetches.needed(e.spec):
            self._spawn(self._load_pinned(name))  # a hub model: fetched, then loaded
        log.info("%s %s by an admin", name, "pinned" if on else "unpinned")
        self.push()
        self._wake.set()
        return {"model": name, "pin": e.spec.pin, "state": e.state}

    async def unload(self, name: str) -> dict[str, Any]:
        """An admin's unload: stop taking requests, finish the running ones, exit."""
        e = self._entry(name)
        self.pool.hold_down(name)
        self._resolve(name, Refusal(503, f"Model '{name}' was unloaded by an admin while "
                                    "loading.", "model_unloaded", retry_after=1))
        if e.state == LOADED:
            self.pool.unloading(name)
            self.push()
            log.info("unloading %s (asked by an admin)", name)
            await self._stop(name)
        elif e.state in ("loading", UNLOADING):
            while e.state != UNLOADED:  # a load in progress is stopped once it is done
                if e.state == LOADED:
                    self.pool.unloading(name)
                    await self._stop(name)
                    break
                await asyncio.sleep(0.1)
        return {"model": name, "state": e.state}

    # ---- the scheduler -----------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            try:
                waiting = await self._pass()
            except Exception:  # noqa: BLE001 - the scheduler must keep going
                log.exception("host scheduler failed; going on")
                waiting = True
            timers = any(self.pool.idle_timeout(e) is not None for e in self.pool.entries.values()
                         if e.state == LOADED)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       self.settings.tick if waiting or timers else 5.0)
            if self.closing:
                continue
            if waiting or timers:
                await self._poll_activity()
            await self._idle_unloads()
            for name in self.pool.pinned_missing():
                self._spawn(self._load_pinned(name))

    async def _pass(self) -> bool:
        """Take steps until there is nothing to do now; True when a load waits."""
        refreshed = False
        while not self.closing:
            step = self.pool.step()
            if step is None:
                self._last_wait = ""
                return False
            if isinstance(step, Wait):
                if step.reason != self._last_wait:
                    log.info("waiting: %s", step.reason)
                    self._last_wait = step.reason
                return True
            if isinstance(step, Ready):
                self._resolve(step.name, None)
            elif isinstance(step, Fail):
                log.error("%s", step.refusal.message)
                self._resolve(step.name, step.refusal)
            elif isinstance(step, Load):
                self.pool.started(step.name)
                self.push()
                self._spawn(self._load(step.name))
            elif isinstance(step, Evict):
                if not refreshed:  # the freshest activity first: LRU order, busy or not
                    await self._poll_activity()
                    refreshed = True
                    continue
                if await self._drain(step.name):
                    head = self.pool.queue[0] if self.pool.queue else "?"
                    e = self.pool.get(step.name)
                    log.info("evicting %s (least recently used idle model, %s) to make room "
                             "for %s", step.name, fmt_bytes(e.need), head)
                    self.pool.unloading(step.name, evicted=True)
                    self.push()
                    self._spawn(self._stop(step.name))
                else:
                    self.pool.get(step.name).busy = max(1, self.pool.get(step.name).busy)
        return False

    def _resolve(self, name: str, refusal: Refusal | None) -> None:
        outcome = self._outcomes.pop(name, None)
        if outcome is None or outcome.done():
            return
        if refusal is None:
            outcome.set_result(None)
        else:
            outcome.set_exception(refusal)
            outcome.exception()  # retrieved: nobody may be waiting any more

    async def _load_pinned(self, name: str) -> None:
        with contextlib.suppress(Refusal):
            await self.ensure(name, admin=True)

    # ---- one worker ----------------------------------------------------------------------------

    def _argv(self, spec: ModelSpec, port: int, address: str) -> list[str]:
        s = self.settings
        argv = [sys.executable, "-m", "llmrelay.cli", "worker", *spec.argv(), "--host",
                s.bind_host, "--port", str(port), "--worker-address", address,
                "--heartbeat-interval", str(s.heartbeat_interval),
                "--shutdown-timeout", str(s.worker_shutdown)]
        if s.controllers:
            argv += ["--controller-address", ",".join(s.controllers)]
        else:
            argv += ["--no-register"]
        return argv

    async def _load(self, name: str) -> None:
        e = self.pool.get(name)
        s = self.settings
        port = free_port(s.bind_host if s.bind_host not in ("0.0.0.0", "::", "") else "127.0.0.1")
        address = default_worker_address(s.bind_host, port, s.controllers[0] if s.controllers
                                         else "")
        log_path = s.worker_log_dir / f"worker-{_safe(name)}.log" if s.worker_log_dir else None
        env = {TOKEN_ENV: s.token} if s.token else {}
        proc = WorkerProc(name, self._argv(e.spec, port, address), env, address, log_path,
                          self.echo)
        self.procs[name] = proc
        log.info("loading %s (%s) on %s", name, fmt_bytes(e.need), address)
        try:
            await proc.start(lambda: self._answers(address), s.load_timeout)
        except (LoadFailed, OSError) as err:
            self.procs.pop(name, None)
            refusal = self.pool.failed(name, str(err))
            log.error("loading %s failed: %s (next try in %.0f s at the earliest)", name, err,
                      refusal.retry_after or 0)
            self._resolve(name, refusal)
        else:
            self.pool.loaded(name, address, proc.pid)
            log.info("%s loaded (pid %d)", name, proc.pid)
            self._resolve(name, None)
            self._spawn(self._watch(name, proc))
        self.push()
        self._wake.set()

    async def _answers(self, address: str) -> bool:
        r = await self.client.post(address + "/worker_get_status", json={}, timeout=2.0)
        return r.status_code == 200

    async def _watch(self, name: str, proc: WorkerProc) -> None:
        code = await proc.wait()
        e = self.pool.get(name)
        if self.procs.get(name) is proc and e.state == LOADED:
            cause = f"its worker exited with code {code}: {proc.cause()}"
            log.error("%s crashed: %s", name, cause)
            self.procs.pop(name, None)
            self.pool.unloaded(name, crash=cause)
            self.push()
            self._wake.set()

    async def _drain(self, name: str) -> bool:
        """Ask the worker to stop taking requests if it has none; whether it did."""
        e = self.pool.get(name)
        try:
            r = await self.client.post(e.address + "/worker_drain_if_idle", timeout=5.0)
            data = r.json()
        except (httpx.HTTPError, ValueError):
            proc = self.procs.get(name)
            return proc is None or not proc.running  # gone: nothing to cut off
        self.pool.activity(name, int(data.get("busy", 0)), int(data.get("requests", 0)),
                           float(data.get("last_used", 0)))
        return bool(data.get("drained"))

    async def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            await proc.stop(self.settings.worker_shutdown + 5)
        self.pool.unloaded(name)
        log.info("%s unloaded", name)
        self.push()
        self._wake.set()

    async def _poll_activity(self) -> None:
        loaded = [e for e in self.pool.entries.values() if e.state == LOADED and e.address]

        async def one(e: Entry) -> None:
            try:
                r = await self.client.get(e.address + "/worker_activity", timeout=2.0)
                data = r.json()
            except (httpx.HTTPError, ValueError):
                return
            self.pool.activity(e.name, int(data.get("busy", 0)), int(data.get("requests", 0)),
                               float(data.get("last_used", 0)))

        await asyncio.gather(*(one(e) for e in loaded))

    async def _idle_unloads(self) -> None:
        for name in self.pool.idle():
            e = self.pool.get(name)
            if e.state == LOADED and await self._drain(name):
                log.info("unloading %s: unused for %.0f s (idle time %s)", name,
                         self.pool.clock() - e.last_used, fmt_duration(self.pool.idle_timeout(e)))
                self.pool.unloading(name)
                self.push()
                self._spawn(self._stop(name))


def rss(pid: int) -> int | None:
    """A process's resident memory (Linux), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)


def check_specs(specs: list[ModelSpec]) -> None:
    """Every spec's flags parse (CatalogError otherwise)."""
    for s in specs:
        worker_args(s)
