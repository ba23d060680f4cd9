"""Runs batches in this API server: each batch's lines through the front doors' serving objects
(execute.py) at the workers' lowest priority, enough of them at once to fill the model's
workers, each answer committed before the next is counted; then the output and error files.

- **How many at once**: for a model, the sum over its workers of their concurrency limit plus
  one (so a worker never idles between two lines), shared by every batch of that model; one
  per worker while other requests of the model are in flight here and for `HOLD` seconds
  after (`Slots`). The lines
  carry priority `batch`, so a worker's fair queue admits interactive requests first:
  interactive latency holds while an idle cluster still runs the batch at full speed.
- **Exactly once**: a line's answer is committed (store.record_line) before it counts as
  done. A restarted API server resumes every unfinished batch (`start`) with the lines that
  have no answer yet; the lines that were running when it died run again, the others never.
- **Failing lines**: a 4xx is the line's answer (error file). A model with no worker free or
  none at all (429, 503) is waited for, retrying until the batch stops; a worker failure (500,
  502, 504) is retried `RETRIES` times, then answered.
- **Stopping**: a cancel (`cancel`) or the end of the window stops the lines in flight (their
  tasks are cancelled, which closes their generations on the workers) and launches no more;
  the batch finalizes with what it has, the rest in the error file (`batch_cancelled`,
  `batch_expired`).
- **Usage**: each line's tokens go to the batch's `usage` and to the usage store under its
  key, with the model named `MODEL (batch)` so `llmrelay usage` shows batch tokens apart.
- **Several API servers** (a shared store, storage.py): a batch runs on the server holding its
  lease, renewed every `RENEW` seconds (`tend`); every server takes over the unfinished batches
  whose lease has lapsed (`LEASE` seconds without renewal: their server died), and a server
  that finds its lease taken stops its lines without finalizing. A cancel made on another
  server reaches the runner at its next renewal.
- **Files expire**: every `sweep` seconds the files past their `expires_at` are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmrelay.api.batch.execute import Doors
from llmrelay.api.batch.lines import Line, read
from llmrelay.api.batch.state import BatchRecord, FileRecord, new_id
from llmrelay.api.batch.storage import Store
from llmrelay.api.errors import APIError
from llmrelay.api.keys import Key
from llmrelay.api.table import WorkerTable
from llmrelay.api.usage import UsageStore
from llmrelay.protocol import dumps

log = logging.getLogger("llmrelay.api")

WAIT = frozenset({429, 503})  # no worker free, or none: wait for one
RETRY = frozenset({500, 502, 504})  # a worker failed: try again, a few times
RETRIES = 3
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_CONCURRENCY = 5  # a worker that does not say its limit (FastChat's)
HOLD = 2.0  # seconds a batch stays narrow after the last interactive request was seen
LEASE = 8.0  # seconds a shared store's batch stays with its server without a renewal
RENEW = 2.0  # seconds between renewals (and looks for batches to take over)
SWEEP = 60.0  # seconds between two sweeps of expired files


def widths(table: WorkerTable, model: str, ours: int = 0) -> tuple[int, int, bool]:
    """For `model`, with `ours` batch lines in flight now: the full width (each worker's
    concurrency limit plus one), the narrow one (one per worker), and whether this server has
    other requests of the model in flight (interactive traffic)."""
    workers = table.serving(model)
    total = 0
    for w in workers:
        limit = w.ours.limit_worker_concurrency if w.ours is not None else 0
        total += (limit or DEFAULT_CONCURRENCY) + 1
    others = sum(table.inflight.get(w.name, 0) for w in workers) - ours
    return max(1, total), max(1, len(workers)), others > 0


class Slots:
    """The lines in flight for one model, across its batches: the full width on an idle model;
    the narrow one while other requests of the model are in flight here and for `hold` seconds
    after the last was seen (every batch row that shares a continuous batch slows each of its
    steps, so interactive traffic gets the workers nearly to itself). Re-read at every release
    and every `TICK` seconds, as requests and workers come and go. Plain Python but for the
    asyncio condition; `clock` injectable."""

    TICK = 0.25

    def __init__(self, widths: Callable[[int], tuple[int, int, bool]], hold: float = HOLD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.widths = widths
        self.hold = hold
        self.clock = clock
        self.used = 0
        self.narrow_until = float("-inf")
        self._freed = asyncio.Condition()

    def size(self) -> int:
        full, narrow, others = self.widths(self.used)
        now = self.clock()
        if others:
            self.narrow_until = now + self.hold
        return narrow if now < self.narrow_until else full

    async def acquire(self) -> None:
        async with self._freed:
            while self.used >= self.size():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), self.TICK)
            self.used += 1

    async def release(self) -> None:
        async with self._freed:
            self.used -= 1
            self._freed.notify()


def output_line(custom_id: str, status: int, body: dict[str, Any], request_id: str
                ) -> dict[str, Any]:
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None}


def unanswered_line(custom_id: str, ending: str) -> dict[str, Any]:
    why = ("the batch was cancelled" if ending == "cancelled"
           else "the batch's completion window ended")
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": f"batch_{ending}",
                      "message": f"This request was not executed: {why} first."}}


class BatchRunner:
    def __init__(self, store: Store, table: WorkerTable, doors: Doors,
                 usage: UsageStore | None = None, clock: Callable[[], float] = time.time,
                 me: str = "", sweep: float = SWEEP) -> None:
        self.store = store
        self.table = table
        self.doors = doors
        self.usage = usage
        self.clock = clock
        self.me = me  # this API server (its address), the runner named in a shared lease
        self.sweep = sweep
        self._tending: asyncio.Task[None] | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.records: dict[str, BatchRecord] = {}  # the running batches' records
        self.stopping: dict[str, str] = {}  # batch id -> cancelled | expired
        self._stop: dict[str, asyncio.Event] = {}
        self._slots: dict[str, Slots] = {}

    # ---- control ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start `tend`, which resumes every batch not yet ended (after a
        restart; with a shared store, those of this server and those whose lease lapsed)."""
        await self.store.open()
        self._tending = asyncio.create_task(self.tend(), name="batch runner")

    async def _take_over(self) -> None:
        now = self.clock()
        for rec in await self.store.unfinished():
            if rec.id in self.tasks or (self.store.shared and rec.runner not in (None, self.me)
                                        and rec.lease_until > now):
                continue
            taken = await self.store.lease(rec, self.me, now, LEASE, True)
            if taken is None:
                continue
            log.info("batch %s: resuming (%s, %d of %d lines answered%s)", taken.id,
                     taken.status, taken.completed + taken.failed, taken.total,
                     f", after {rec.runner}" if rec.runner not in (None, self.me) else "")
            self.launch(taken)

    async def tend(self) -> None:
        """Forever: resume the unfinished batches (at first; with a shared store, every turn:
        those whose lease lapsed), after renewing this server's leases (a cancel made elsewhere
        shows then; a lease another server holds now stops the batch here); every `sweep`
        seconds, delete the files that expired."""
        period = min(RENEW, self.sweep) if self.store.shared else self.sweep
        next_sweep = 0.0
        resumed = False
        while True:
            try:
                now = self.clock()
                if self.store.shared:
                    for rec in list(self.records.values()):
                        await self._renew(rec, now)
                if self.store.shared or not resumed:
                    await self._take_over()
                    resumed = True
                if now >= next_sweep:
                    for file_id in await self.store.expire(now):
                        log.info("file %s expired: deleted", file_id)
                    next_sweep = now + self.sweep
            except asyncio.CancelledError:
                raise
            except APIError as e:  # the store is not reachable yet (NATS): next turn
                log.debug("batch runner: %s", e.message)
            except Exception as e:  # e.g. NATS electing a leader: next turn
                log.warning("batch runner: tending failed (%s: %s); trying again",
                            type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            await asyncio.sleep(min(period, 1.0) if not resumed else period)

    async def _renew(self, rec: BatchRecord, now: float) -> None:
        running = rec.status in ("in_progress", "cancelling")  # else finalizing: its own
        stored = await self.store.lease(rec, self.me, now, LEASE, False)  # writes go on
        if stored is None:
            if running:
                log.warning("batch %s: another API server holds it now; stopping here", rec.id)
                self.stop(rec.id, "lost")
            return
        if running:
            rec.adopt(stored)
            if stored.status == "cancelling":
                self.stop(rec.id, "cancelled")

    def launch(self, rec: BatchRecord) -> None:
        if rec.id not in self.tasks:
            self.records[rec.id] = rec
            self._stop[rec.id] = asyncio.Event()
            self.tasks[rec.id] = asyncio.create_task(self._run(rec), name=f"batch {rec.id}")

    async def cancel(self, rec: BatchRecord) -> BatchRecord:
        """Its owner cancels a batch (`rec` as just read from the store): `cancelling`, its
        lines stopped, then `cancelled` once finalized. 409 for a batch that has ended."""
        now = self.clock()
        stored = await self.store.update_batch(rec.owner, rec.id, lambda r: r.cancel(now))
        running = self.records.get(rec.id)
        if running is not None:
            running.cancel(now)
            self.stop(rec.id, "cancelled")
            return running
        if stored is None:
            return rec
        if stored.status == "cancelling" and not self.store.shared:
            self.launch(stored)  # with a shared store: its runner (or a taker-over) ends it
        return stored

    def stop(self, batch_id: str, why: str) -> None:
        """Stop a running batch's lines (`why`: cancelled or expired); it then finalizes."""
        self.stopping.setdefault(batch_id, why)
        event = self._stop.get(batch_id)
        if event is not None:
            event.set()

    async def aclose(self) -> None:
        """Shutting down: stop the tasks, leaving every batch as stored (resumed at start)."""
        tasks = list(self.tasks.values())
        if self._tending is not None:
            tasks.append(self._tending)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.store.aclose()

    # ---- one batch -------------------------------------------------------------------------

    async def _run(self, rec: BatchRecord) -> None:
        try:
            if rec.status in ("in_progress", "cancelling"):
                ending = await self._lines(rec)
                if ending == "lost":
                    return
                now = self.clock()
                await self._change(rec, lambda r: r.finalize(ending, now))
            if rec.status == "finalizing":
                await self._finalize(rec)
            log.info("batch %s: %s (%d completed, %d failed of %d)", rec.id, rec.status,
                     rec.completed, rec.failed, rec.total)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s failed", rec.id)
            now = self.clock()
            await self._change(rec, lambda r: r.fail(
                [{"code": "server_error", "message": "The server had an error while running "
                  "this batch.", "param": None, "line": None}], now))
        finally:
            self.tasks.pop(rec.id, None)
            self.records.pop(rec.id, None)
            self._stop.pop(rec.id, None)
            self.stopping.pop(rec.id, None)

    async def _change(self, rec: BatchRecord, change: Callable[[BatchRecord], None]) -> None:
        stored = await self.store.update_batch(rec.owner, rec.id, change)
        if stored is not None:
            rec.adopt(stored)

    def _ending(self, rec: BatchRecord) -> str | None:
        if self.stopping.get(rec.id) == "lost":
            return "lost"
        if rec.status == "cancelling" or self.stopping.get(rec.id) == "cancelled":
            return "cancelled"
        if self.stopping.get(rec.id) == "expired" or self.clock() >= rec.expires_at:
            return "expired"
        return None

    async def _lines(self, rec: BatchRecord) -> str:
        """Run the lines not yet answered; how the batch ends (completed, cancelled, expired)."""
        ending = self._ending(rec)
        if ending is not None:
            return ending
        data = await self.store.read_file(rec.input_file_id)
        answered = await self.store.answered(rec.id)
        todo = [line for line in read(data) if line.number not in answered]
        stop = self._stop[rec.id]
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, rec.expires_at - self.clock()), self.stop, rec.id,
                                "expired")
        model = rec.model or ""
        slots = self._slots.get(model)
        if slots is None:
            slots = self._slots[model] = Slots(lambda used: widths(self.table, model, used))
        key = Key(name=rec.key_name, priority="batch")
        running: set[asyncio.Task[None]] = set()
        try:
            for line in todo:
                acquired = asyncio.ensure_future(slots.acquire())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({acquired, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if stop.is_set():
                    if not acquired.cancel():
                        await slots.release()
                    break
                task = asyncio.create_task(self._line(rec, line, key, slots))
                running.add(task)
                task.add_done_callback(running.discard)
            waiting = asyncio.ensure_future(stop.wait())
            while running and not stop.is_set():
                await asyncio.wait({waiting, *running}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        finally:
            timer.cancel()
            for t in list(running):
                t.cancel()
            for t in list(running):
                with contextlib.suppress(BaseException):
                    await t
        return self._ending(rec) or "completed"

    async def _line(self, rec: BatchRecord, line: Line, key: Key, slots: Slots) -> None:
        try:
            request_id = f"{rec.id}-{line.number}"
            failures = 0
            while True:
                status, body, prompt, completion = await self.doors.run(
                    rec.endpoint, line.body, request_id, rec.owner, key)
                if status in WAIT or status in RETRY and failures < RETRIES:
                    failures += status in RETRY
                    delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                    log.info("batch %s line %d: %d, again in %.1f s", rec.id, line.number,
                             status, delay)
                    await asyncio.sleep(delay)
                    continue
                break
            result = output_line(line.custom_id, status, body, request_id)
            new = await self.store.record_line(rec, line.number, status == 200, result, prompt,
                                               completion)
            if new and self.usage is not None and prompt + completion:
                await self.usage.record(rec.key_name, f"{rec.model} (batch)", prompt, completion)
        finally:
            await slots.release()

    async def _finalize(self, rec: BatchRecord) -> None:
        """Write the output and error files (input order), then end the batch."""
        ending = rec.ending or "completed"
        data = await self.store.read_file(rec.input_file_id)
        results = await self.store.results(rec.id)
        by_line = {n: (ok, body) for n, ok, body in results}
        out: list[bytes] = []
        err: list[bytes] = []
        for line in read(data):
            got = by_line.get(line.number)
            if got is None:
                err.append(dumps(unanswered_line(line.custom_id, ending)))
            else:
                (out if got[0] else err).append(bytes(got[1]))
        now = int(self.clock())
        files: list[tuple[FileRecord, Path]] = []
        ids: list[str | None] = []
        for kind, rows in (("output", out), ("error", err)):
            if not rows:
                ids.append(None)
                continue
            content = b"\n".join(rows) + b"\n"
            staged = self.store.staging()
            await asyncio.to_thread(staged.write_bytes, content)
            expires = None if rec.output_expires_after is None else now + rec.output_expires_after
            f = FileRecord(new_id("file-"), rec.owner, f"{rec.id}_{kind}.jsonl", "batch_output",
                           len(content), now, expires)
            files.append((f, staged))
            ids.append(f.id)
        rec.finish(ids[0], ids[1], self.clock())
        await self.store.finish_batch(rec, files)
