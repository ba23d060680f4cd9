"""Usage per API key: requests, prompt and completion tokens, by model and day, kept in an
embedded SQLite database in the API server's data folder (WAL mode; survives restarts).

`submit` is called once per answered request, from the event loop: it adds the counts in
memory, and a dedicated thread writes what has gathered in one transaction FLUSH_DELAY later (a
transaction per request cost the API server more CPU than the rest of a short request). So a
kill -9 may lose the last FLUSH_DELAY's counts; a normal stop writes them (`close`). `report` is
what `GET /v1/usage` and `llmrelay usage` show; it writes what is pending first.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("llmrelay.api")

FLUSH_DELAY = 0.25  # seconds submitted counts wait, gathering, before they are written

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,            -- UTC date, YYYY-MM-DD
    key TEXT NOT NULL,            -- the key's name, never the key
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, model)
)
"""


class UsageStore:
    """Counts per (day, key, model) in SQLite."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="usage-db")
        # (day, key, model) -> [requests, prompt tokens, completion tokens] not yet written
        self._pending: dict[tuple[str, str, str], list[int]] = {}
        self._pending_lock = threading.Lock()
        self._flush_queued = False

    def record_now(self, key: str, model: str, prompt_tokens: int, completion_tokens: int,
                   when: float | None = None) -> None:
        """Count one request and write it (and anything pending) now."""
        self._add(key, model, prompt_tokens, completion_tokens, when)
        self.flush()

    def submit(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one request; written within FLUSH_DELAY, off the event loop."""
        if self._add(key, model, prompt_tokens, completion_tokens):
            self._pool.submit(self._flush_later).add_done_callback(_log_failure)

    def _add(self, key: str, model: str, prompt_tokens: int, completion_tokens: int,
             when: float | None = None) -> bool:
        """Add to the pending counts; True if a write must be queued for them."""
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if when is None else when))
        with self._pending_lock:
            row = self._pending.setdefault((day, key, model), [0, 0, 0])
            row[0] += 1
            row[1] += prompt_tokens
            row[2] += completion_tokens
            queue, self._flush_queued = not self._flush_queued, True
        return queue

    def _flush_later(self) -> None:
        time.sleep(FLUSH_DELAY)
        self.flush()

    def flush(self) -> None:
        """Write every pending count, in one transaction."""
        with self._pending_lock:
            rows, self._pending, self._flush_queued = self._pending, {}, False
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day, key, model) DO "
                    "UPDATE SET requests = requests + excluded.requests, prompt_tokens = "
                    "prompt_tokens + excluded.prompt_tokens, completion_tokens = "
                    "completion_tokens + excluded.completion_tokens",
                    [(*k, *v) for k, v in rows.items()])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    async def report_async(self, since: str | None = None, key: str | None = None
                           ) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.report, since,
                                                                key)

    def today(self) -> dict[str, int]:
        """Tokens (prompt + completion) per key today (UTC)."""
        self.flush()
        day = time.strftime("%Y-%m-%d", time.gmtime())
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

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.flush()
        with self._lock:
            self._db.close()


def _log_failure(future: Any) -> None:
    e = future.exception()
    if e is not None:
        log.error("could not write usage to the database: %s", e)
