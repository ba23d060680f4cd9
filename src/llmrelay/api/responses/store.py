"""Stored Responses: what `GET /v1/responses/{id}`, `DELETE`, `input_items` and
`previous_response_id` read.

`ResponseStore` is the interface (a NATS JetStream key-value store can implement it for several
API servers; nothing above it knows which). `SqliteResponseStore` is the embedded default: one
SQLite file in the API server's data folder, WAL mode, so stored responses survive a restart.
It keeps within a size limit and an age limit: responses older than the age limit are gone,
and past the size limit the oldest are evicted first.

Each record belongs to an owner: the SHA-256 of the API key that made it (never the key), or ""
on a server without keys. A record is found only by its owner: another key's id reads as
unknown, exactly like an id that never existed.

Database work runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmrelay.api.database import open_database
from llmrelay.protocol import dumps, loads

log = logging.getLogger("llmrelay.api")

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_AGE = 30 * 86400.0  # OpenAI keeps stored responses 30 days
EVICT_BATCH = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,          -- sha256 of the API key that made it, never the key; '' without keys
    created_at REAL NOT NULL,     -- unix time
    size INTEGER NOT NULL,        -- bytes of the two JSON columns
    response BLOB NOT NULL,       -- the Response object, JSON
    input_items BLOB NOT NULL     -- the items it answered (its conversation so far), JSON
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


@dataclass
class StoredResponse:
    id: str
    owner: str
    created_at: float
    response: dict[str, Any]  # the Response object as JSON
    input_items: list[dict[str, Any]]  # the conversation it answered, in item form, with ids


class ResponseStore(Protocol):
    """Where stored Responses live (see the module docstring)."""

    async def put(self, record: StoredResponse) -> None: ...

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The record, if it exists, belongs to `owner` and is within the age limit."""

    async def delete(self, owner: str, response_id: str) -> bool:
        """Whether there was such a record of `owner`'s to delete."""

    def close(self) -> None: ...


class SqliteResponseStore:
    """The embedded store (see the module docstring); `path` ":memory:" keeps nothing on disk."""

    def __init__(self, path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_age: float = DEFAULT_MAX_AGE, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        self._db = open_database(path, SCHEMA)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="responses-db")
        self.total = int(self._db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0])

    # ---- plain calls (on the store's thread, or in tests) ------------------------------------

    def put_now(self, record: StoredResponse) -> None:
        response, items = dumps(record.response), dumps(record.input_items)
        size = len(response) + len(items)
        with self._lock:
            self._expire()
            old = self._db.execute("SELECT size FROM responses WHERE id = ?",
                                   (record.id,)).fetchone()
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                             (record.id, record.owner, record.created_at, size, response, items))
            self.total += size - (old[0] if old else 0)
            if size > self.max_bytes:
                log.warning("response %s (%d bytes) is larger than the whole store's limit "
                            "(%d bytes): it is not kept; raise --responses-max-mb",
                            record.id, size, self.max_bytes)
            self._shrink()

    def get_now(self, owner: str, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT created_at, response, input_items FROM responses "
                "WHERE id = ? AND owner = ? AND created_at >= ?",
                (response_id, owner, self.clock() - self.max_age)).fetchone()
        if row is None:
            return None
        return StoredResponse(response_id, owner, row[0], loads(row[1]), loads(row[2]))

    def delete_now(self, owner: str, response_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT size FROM responses WHERE id = ? AND owner = ?",
                                   (response_id, owner)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            self.total -= row[0]
            return True

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def _expire(self) -> None:
        """Drop what is past the age limit (under the lock)."""
        cutoff = self.clock() - self.max_age
        gone = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM responses "
                                "WHERE created_at < ?", (cutoff,)).fetchone()
        if gone[1]:
            self._db.execute("DELETE FROM responses WHERE created_at < ?", (cutoff,))
            self.total -= int(gone[0])

    def _shrink(self) -> None:
        """Evict the oldest until within the size limit (under the lock)."""
        while self.total > self.max_bytes:
            rows = self._db.execute("SELECT id, size FROM responses ORDER BY created_at "
                                    "LIMIT ?", (EVICT_BATCH,)).fetchall()
            if not rows:
                self.total = 0
                return
            evict = []
            for rid, size in rows:
                evict.append((rid,))
                self.total -= size
                if self.total <= self.max_bytes:
                    break
            self._db.executemany("DELETE FROM responses WHERE id = ?", evict)

    # ---- the interface: the same, off the event loop ------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def put(self, record: StoredResponse) -> None:
        await self._run(self.put_now, record)

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        return await self._run(self.get_now, owner, response_id)  # type: ignore[no-any-return]

    async def delete(self, owner: str, response_id: str) -> bool:
        return await self._run(self.delete_now, owner, response_id)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            self._db.close()
