"""Usage per API key: requests, prompt and completion tokens, by model and day, kept in an
embedded SQLite database in the API server's data folder (WAL mode; survives restarts).

`submit` (or `record`) is called once per answered request, from the event loop: one small
transaction on a dedicated thread, never blocking the loop. `report` is what `GET /v1/usage` and
`llmrelay usage` show; `report_async` runs it on that same thread, after every count submitted
before it.
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

    def record_now(self, key: str, model: str, prompt_tokens: int, completion_tokens: int,
                   when: float | None = None) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if when is None else when))
        with self._lock:
            self._db.execute(
                "INSERT INTO usage VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (day, key, model) DO "
                "UPDATE SET requests = requests + 1, prompt_tokens = prompt_tokens + "
                "excluded.prompt_tokens, completion_tokens = completion_tokens + "
                "excluded.completion_tokens", (day, key, model, prompt_tokens, completion_tokens))

    async def record(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._pool, self.record_now, key, model, prompt_tokens, completion_tokens)

    def submit(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """`record` without waiting for it (a failure is logged)."""
        future = self._pool.submit(self.record_now, key, model, prompt_tokens, completion_tokens)
        future.add_done_callback(_log_failure)

    async def report_async(self, since: str | None = None, key: str | None = None
                           ) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.report, since,
                                                                key)

    def today(self) -> dict[str, int]:
        """Tokens (prompt + completion) per key today (UTC)."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        with self._lock:
            rows = self._db.execute("SELECT key, SUM(prompt_tokens + completion_tokens) FROM "
                                    "usage WHERE day = ? GROUP BY key", (day,)).fetchall()
        return {k: int(n) for k, n in rows}

    def report(self, since: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
        """Rows by day, key and model (newest day first); `since`: a YYYY-MM-DD date."""
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
        with self._lock:
            self._db.close()


def _log_failure(future: Any) -> None:
    e = future.exception()
    if e is not None:
        log.error("could not write usage to the database: %s", e)
