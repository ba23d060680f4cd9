"""Files and batches, durably: three tables in the API server's embedded SQLite database (the
same file as the stored Responses, `responses.sqlite`, WAL mode) and the files' bytes beside it
(`files/<id>`).

- `files`: one row per file (its owner, name, purpose, size, when it expires); its bytes are
  written to disk and renamed into place before the row is committed, so a row always has its
  bytes. `expire` (the runner's sweep) deletes the files past their `expires_at`.
- `batches`: one row per batch: the record (state.BatchRecord) as JSON, with its owner and
  status as columns for the lists.
- `batch_lines`: each answered line of a running batch, committed in the same transaction as
  the batch's counts, before the runner moves on: after a crash the batch resumes with the
  lines that have no row here (each line is answered once). Finalizing writes the output and
  error files from these rows, then commits the files, the batch's end and the rows' removal
  in one transaction.

An owner is the SHA-256 of the API key (never the key), "" on a server without keys; a file or
batch is found only by its owner (`owner=None`: the server itself, e.g. the runner). Database
work runs on one dedicated thread, never on the event loop (`call`); storage.py's `LocalStore`
is the async face the runner and the endpoints use (with the NATS registry, natsstore.py
replaces both).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from llmrelay.api.batch.state import TERMINAL, BatchRecord, FileRecord
from llmrelay.api.database import open_database
from llmrelay.protocol import dumps, loads

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,          -- sha256 of the API key, never the key; '' without keys
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER            -- NULL: kept until deleted
);
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner, created_at);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    record BLOB NOT NULL          -- state.BatchRecord as JSON
);
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, created_at);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,        -- 1-based line of the input file
    ok INTEGER NOT NULL,          -- 1: status 200 (output file), 0: error file
    result BLOB NOT NULL,         -- the output line, JSON
    PRIMARY KEY (batch_id, line)
);
"""
TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in TERMINAL) + ")"
FILE_COLUMNS = "id, owner, filename, purpose, bytes, created_at, expires_at"


class BatchStore:
    """See the module docstring. `path` ":memory:" keeps nothing (the files go to a temporary
    folder, removed with the process)."""

    def __init__(self, path: Path | str, files_dir: Path | None = None) -> None:
        if str(path) == ":memory:":
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="llmrelay-files-")
            self.files_dir = Path(self._tmp.name)
        else:
            self._tmp = None
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.files_dir = files_dir or Path(path).parent / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.path = path
        # the responses' connection shares the file: a write waits for theirs
        self._db = open_database(path, SCHEMA, busy_timeout_ms=5000)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        if "expires_at" not in columns:  # a database from before files expired
            self._db.execute("ALTER TABLE files ADD COLUMN expires_at INTEGER")
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batch-db")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            self._db.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # ---- files ---------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def staging(self) -> Path:
        """A new path in the files' folder to write an upload to before `add_file`."""
        fd, name = tempfile.mkstemp(dir=self.files_dir, prefix=".upload-")
        os.close(fd)
        return Path(name)

    def add_file(self, record: FileRecord, staged: Path) -> None:
        """Move `staged` into place as the file's bytes (flushed to disk), then commit its row."""
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, self.file_path(record.id))
        with self._lock:
            self._db.execute(f"INSERT INTO files ({FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (record.id, record.owner, record.filename, record.purpose,
                              record.bytes, record.created_at, record.expires_at))

    def get_file(self, owner: str | None, file_id: str) -> FileRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?",
                                   (file_id,)).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            return None
        return FileRecord(*row)

    def list_files(self, owner: str, purpose: str | None = None) -> list[FileRecord]:
        """Every file of `owner`, oldest first."""
        query = f"SELECT {FILE_COLUMNS} FROM files WHERE owner = ?"
        args: list[Any] = [owner]
        if purpose:
            query += " AND purpose = ?"
            args.append(purpose)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at, rowid", args).fetchall()
        return [FileRecord(*r) for r in rows]

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM files WHERE id = ? AND owner = ?",
                                   (file_id, owner))
        if not cur.rowcount:
            return False
        self.file_path(file_id).unlink(missing_ok=True)
        return True

    def expire(self, now: float) -> list[str]:
        """Delete every file past its `expires_at` (rows, then bytes); their ids."""
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (int(now),)).fetchall()]
            self._db.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in ids])
        for file_id in ids:
            self.file_path(file_id).unlink(missing_ok=True)
        return ids

    def stored_bytes(self, owner: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE "
                                        "owner = ?", (owner,)).fetchone()[0])

    def read_file(self, file_id: str) -> bytes:
        return self.file_path(file_id).read_bytes()

    # ---- batches -------------------------------------------------------------------------------

    def put_batch(self, record: BatchRecord) -> None:
        """Insert or update a batch's row."""
        with self._lock:
            self._save(record)

    def _save(self, record: BatchRecord) -> None:
        self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?)",
                         (record.id, record.owner, record.status, record.created_at,
                          dumps(record.to_json())))

    def update_batch(self, owner: str, batch_id: str, change: Callable[[BatchRecord], None]
                     ) -> BatchRecord | None:
        """`change` applied to the batch as stored, and saved (None: no such batch of `owner`);
        what `change` raises leaves it as it was."""
        with self._lock:
            record = self._get(owner, batch_id)
            if record is not None:
                change(record)
                self._save(record)
        return record

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        with self._lock:
            return self._get(owner, batch_id)

    def _get(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        row = self._db.execute("SELECT owner, record FROM batches WHERE id = ?",
                               (batch_id,)).fetchone()
        if row is None or (owner is not None and row[0] != owner):
            return None
        return BatchRecord.from_json(loads(row[1]))

    def list_batches(self, owner: str) -> list[BatchRecord]:
        """Every batch of `owner`, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM batches WHERE owner = ? ORDER BY "
                                    "created_at DESC, rowid DESC", (owner,)).fetchall()
        return [BatchRecord.from_json(loads(r[0])) for r in rows]

    def open_batches(self, owner: str) -> int:
        with self._lock:
            return int(self._db.execute(
                f"SELECT COUNT(*) FROM batches WHERE owner = ? AND status NOT IN {TERMINAL_SQL}",
                (owner,)).fetchone()[0])

    def unfinished(self) -> list[BatchRecord]:
        """Every batch not yet ended (to resume at start), oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT record FROM batches WHERE status NOT IN "
                                    f"{TERMINAL_SQL} ORDER BY created_at, rowid").fetchall()
        return [BatchRecord.from_json(loads(r[0])) for r in rows]

    # ---- a running batch's lines ---------------------------------------------------------------

    def record_line(self, record: BatchRecord, line: int, ok: bool, result: dict[str, Any],
                    prompt_tokens: int, completion_tokens: int) -> bool:
        """Commit one answered line with the batch's counts (`record` is updated); False if the
        line was answered already (then nothing changes)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("INSERT OR IGNORE INTO batch_lines VALUES (?, ?, ?, ?)",
                                       (record.id, line, int(ok), dumps(result)))
                if cur.rowcount:
                    record.count(ok, prompt_tokens, completion_tokens)
                    self._save(record)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(cur.rowcount)

    def answered(self, batch_id: str) -> set[int]:
        with self._lock:
            rows = self._db.execute("SELECT line FROM batch_lines WHERE batch_id = ?",
                                    (batch_id,)).fetchall()
        return {r[0] for r in rows}

    def results(self, batch_id: str) -> Iterator[tuple[int, bool, bytes]]:
        """The answered lines, in input order: (line, ok, result JSON)."""
        with self._lock:
            rows = self._db.execute("SELECT line, ok, result FROM batch_lines WHERE batch_id = ? "
                                    "ORDER BY line", (batch_id,)).fetchall()
        for line, ok, result in rows:
            yield line, bool(ok), result

    def finish_batch(self, record: BatchRecord, files: list[tuple[FileRecord, Path]]) -> None:
        """The batch's output files (already written to their staged paths) and its end, in one
        transaction; its line rows go."""
        for f, staged in files:
            with open(staged, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(staged, self.file_path(f.id))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for f, _ in files:
                    self._db.execute(f"INSERT OR REPLACE INTO files ({FILE_COLUMNS}) VALUES "
                                     "(?, ?, ?, ?, ?, ?, ?)", (f.id, f.owner, f.filename,
                                                               f.purpose, f.bytes, f.created_at,
                                                               f.expires_at))
                self._save(record)
                self._db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (record.id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
