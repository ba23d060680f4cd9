"""Usage per API key: requests, prompt and completion tokens, by model and day, and the
requests refused at a limit (429s), by limit and day, kept in an embedded SQLite database in the
API server's data folder (WAL mode; survives restarts).

`record` is awaited once per answered request, before the answer's last bytes leave (observe.py
and access.py see to that): it hands the counts to a dedicated writer thread and returns once
the transaction that holds them has committed. The writer commits whatever has gathered while
it was busy in one transaction (group commit): a lone request waits for one short commit, no
fixed delay; many concurrent requests share one. A commit survives a crash of the process
(kill -9): WAL mode with `synchronous=NORMAL` hands each commit to the operating system before
it returns (a power cut may still lose the last commits; see docs/keys-and-limits.md).
`report` is what `GET /v1/usage` and `llmrelay usage` show. `refused` counts a 429 the same
way (committed before the 429 leaves); `refusals` is what the web console's keys table shows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmrelay.api.database import open_database

log = logging.getLogger("llmrelay.api")

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,            -- UTC date, YYYY-MM-DD
    key TEXT NOT NULL,            -- the key's name, never the key
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, model)
);
CREATE TABLE IF NOT EXISTS rate_limited (
    day TEXT NOT NULL,            -- UTC date, YYYY-MM-DD
    key TEXT NOT NULL,            -- the key's name
    kind TEXT NOT NULL,           -- the limit: requests, tokens, concurrent, ...
    count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, kind)
)
"""

UPSERT = ("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day, key, model) DO UPDATE "
          "SET requests = requests + excluded.requests, prompt_tokens = prompt_tokens + "
          "excluded.prompt_tokens, completion_tokens = completion_tokens + "
          "excluded.completion_tokens")
UPSERT_REFUSED = ("INSERT INTO rate_limited VALUES (?, ?, ?, ?) ON CONFLICT (day, key, kind) DO "
                  "UPDATE SET count = count + excluded.count")


def utc_day(when: float | None = None) -> str:
    """The UTC date of `when` (default: now), YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if when is None else when))


class UsageStore:
    """Counts per (day, key, model), and 429s per (day, key, limit), in SQLite, written by one
    thread with group commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_database(path, SCHEMA)
        self._lock = threading.Lock()  # the connection
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="usage-read")  # report_async
        # (day, key, model) -> [requests, prompt tokens, completion tokens] not yet written,
        # and the futures of the requests whose counts they hold (resolved once committed)
        self._pending: dict[tuple[str, str, str], list[int]] = {}
        self._refused: dict[tuple[str, str, str], int] = {}  # (day, key, limit) -> 429s
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = threading.Condition()
        self._closed = False
        self.commits = 0  # transactions written (concurrent requests share one)
        self._writer = threading.Thread(target=self._write_loop, name="usage-db", daemon=True)
        self._writer.start()

    async def record(self, key: str, model: str, prompt_tokens: int,
                     completion_tokens: int) -> None:
        """Count one request; returns once its counts are committed (raises what the write
        raised). Concurrent requests share one transaction."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._wake:
            self._add(key, model, prompt_tokens, completion_tokens)
            self._waiters.append(done)
            self._wake.notify()
        await done

    async def refused(self, key: str, limit: str) -> None:
        """Count one request refused at `limit` (a 429); returns once it is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._wake:
            k = (utc_day(), key, limit)
            self._refused[k] = self._refused.get(k, 0) + 1
            self._waiters.append(done)
            self._wake.notify()
        await done

    def record_now(self, key: str, model: str, prompt_tokens: int, completion_tokens: int,
                   when: float | None = None) -> None:
        """Count one request and write it (and anything pending) now, from this thread."""
        with self._wake:
            self._add(key, model, prompt_tokens, completion_tokens, when)
        self.flush()

    def _add(self, key: str, model: str, prompt_tokens: int, completion_tokens: int,
             when: float | None = None) -> None:
        """Add to the pending counts (the caller holds `_wake`)."""
        day = utc_day(when)
        row = self._pending.setdefault((day, key, model), [0, 0, 0])
        row[0] += 1
        row[1] += prompt_tokens
        row[2] += completion_tokens

    def _write_loop(self) -> None:
        """The writer: waits for counts, commits all that gathered, again."""
        while True:
            with self._wake:
                while not self._pending and not self._refused and not self._closed:
                    self._wake.wait()
                if not self._pending and not self._refused:
                    return  # closed, nothing left
            try:
                self.flush()
            except Exception as e:  # flush told the waiters; keep serving the next ones
                log.error("could not write usage to the database: %s", e)

    def flush(self) -> None:
        """Write every pending count, in one transaction; then wake the requests waiting for
        them (with the error, if the write failed, which is raised here too)."""
        with self._wake:
            rows, self._pending = self._pending, {}
            refused, self._refused = self._refused, {}
            waiters, self._waiters = self._waiters, []
        error: BaseException | None = None
        try:
            if rows or refused:
                with self._lock:
                    self._db.execute("BEGIN")
                    try:
                        self._db.executemany(UPSERT, [(*k, *v) for k, v in rows.items()])
                        self._db.executemany(UPSERT_REFUSED,
                                             [(*k, n) for k, n in refused.items()])
                        self._db.execute("COMMIT")
                        self.commits += 1
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
        except BaseException as e:
            error = e
            raise
        finally:
            _wake_waiters(waiters, error)

    async def report_async(self, since: str | None = None, key: str | None = None
                           ) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.report, since,
                                                                key)

    def today(self) -> dict[str, int]:
        """Tokens (prompt + completion) per key today (UTC)."""
        self.flush()
        day = utc_day()
        with self._lock:
            rows = self._db.execute("SELECT key, SUM(prompt_tokens + completion_tokens) FROM "
                                    "usage WHERE day = ? GROUP BY key", (day,)).fetchall()
        return {k: int(n) for k, n in rows}

    def report(self, since: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
        """Rows by day, key and model (newest day first); `since`: a YYYY-MM-DD date."""
        self.flush()
        query = "SELECT day, key, model, requests, prompt_tokens, completion_tokens FROM usage"
        where, args = [], []
        if since:
            where.append("day >= ?")
            args.append(since)
        if key:
            where.append("key = ?")
            args.append(key)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY day DESC, key, model"
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        names = ("day", "key", "model", "requests", "prompt_tokens", "completion_tokens")
        return [dict(zip(names, r, strict=True)) for r in rows]

    def refusals(self, day: str) -> dict[str, dict[str, int]]:
        """The 429s of `day` (YYYY-MM-DD, UTC): key -> limit -> count."""
        self.flush()
        with self._lock:
            rows = self._db.execute("SELECT key, kind, count FROM rate_limited WHERE day = ?",
                                    (day,)).fetchall()
        out: dict[str, dict[str, int]] = {}
        for key, kind, n in rows:
            out.setdefault(key, {})[kind] = int(n)
        return out

    async def refusals_async(self, day: str) -> dict[str, dict[str, int]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.refusals, day)

    def close(self) -> None:
        """Write what is pending and close the database."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._writer.join()
        self._pool.shutdown(wait=True)
        self.flush()
        with self._lock:
            self._db.close()


def _wake_waiters(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """Resolve the futures of committed counts: one call into each event loop, not one per
    request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for f in waiters:
        by_loop.setdefault(f.get_loop(), []).append(f)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for f in futures:
        if not f.done():
            if error is None:
                f.set_result(None)
            else:
                f.set_exception(error)
