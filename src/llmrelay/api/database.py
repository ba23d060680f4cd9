"""The API server's embedded SQLite databases (usage, stored responses, files and batches,
votes), opened one way: the folder made, autocommit (transactions are explicit), WAL with
`synchronous=NORMAL` (a commit survives a crash of the process; the last ones may not survive
a power cut), shareable across the store's own threads, and the schema created. ":memory:"
keeps nothing on disk (tests)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_database(path: Path | str, schema: str, busy_timeout_ms: int = 0) -> sqlite3.Connection:
    """A connection to the database at `path`, with `schema` (statements) applied;
    `busy_timeout_ms`: how long a write waits for another connection's (same file)."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    if busy_timeout_ms:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    db.executescript(schema)
    return db
