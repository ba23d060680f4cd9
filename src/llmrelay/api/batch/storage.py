"""Where files and batches live, as the runner and the endpoints see it: `Store`, with two
implementations.

- `LocalStore` (one API server, the default): store.py's SQLite database in the data folder and
  the files' bytes on its disk; a batch runs on the server that took it and resumes when that
  server restarts.
- `natsstore.NatsStore` (`--registry nats://...`): the rows in a JetStream key-value bucket and
  the bytes in a JetStream object store of the registry's NATS, so every API server on it
  serves every file and batch; a batch runs on one of them under a lease it renews (`shared`:
  the runner takes over a batch whose lease has lapsed, e.g. its server was killed).

A batch record changes through `update_batch` (read, change, write: compare-and-set where
several servers write), a line's answer through `record_line` (at most once per line).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmrelay.api.batch.state import BatchRecord, FileRecord
from llmrelay.api.batch.store import BatchStore

T = TypeVar("T")


class Store(Protocol):
    shared: bool  # several API servers use it: batches run under leases

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    def staging(self) -> Path: ...
    async def add_file(self, record: FileRecord, staged: Path) -> None: ...
    async def get_file(self, owner: str, file_id: str) -> FileRecord | None: ...
    async def list_files(self, owner: str, purpose: str | None) -> list[FileRecord]: ...
    async def delete_file(self, owner: str, file_id: str) -> bool: ...
    async def stored_bytes(self, owner: str) -> int: ...
    async def read_file(self, file_id: str) -> bytes: ...
    async def content(self, file_id: str) -> Path | bytes: ...
    async def expire(self, now: float) -> list[str]: ...
    async def put_batch(self, record: BatchRecord) -> None: ...
    async def update_batch(self, owner: str, batch_id: str,
                           change: Callable[[BatchRecord], None]) -> BatchRecord | None: ...
    async def get_batch(self, owner: str, batch_id: str) -> BatchRecord | None: ...
    async def list_batches(self, owner: str) -> list[BatchRecord]: ...
    async def open_batches(self, owner: str) -> int: ...
    async def unfinished(self) -> list[BatchRecord]: ...
    async def record_line(self, record: BatchRecord, line: int, ok: bool,
                          result: dict[str, Any], prompt_tokens: int,
                          completion_tokens: int) -> bool: ...
    async def answered(self, batch_id: str) -> set[int]: ...
    async def results(self, batch_id: str) -> list[tuple[int, bool, bytes]]: ...
    async def finish_batch(self, record: BatchRecord,
                           files: list[tuple[FileRecord, Path]]) -> None: ...
    async def lease(self, record: BatchRecord, me: str, now: float, seconds: float,
                    fresh: bool) -> BatchRecord | None:
        """Shared stores: take or renew the batch for `me` until `now + seconds` if it is not
        ended and nobody else holds a live lease (compare-and-set); the batch as stored then
        (`fresh`: its counts recomputed from its answered lines, for a batch this process did
        not run yet), None if another holds it."""
        ...


class LocalStore:
    """`Store` over store.py's SQLite `BatchStore`, its calls on the store's own thread."""

    shared = False

    def __init__(self, db: BatchStore) -> None:
        self.db = db

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        self.db.close()

    def staging(self) -> Path:
        return self.db.staging()

    async def add_file(self, record: FileRecord, staged: Path) -> None:
        await self.db.call(self.db.add_file, record, staged)

    async def get_file(self, owner: str, file_id: str) -> FileRecord | None:
        return await self.db.call(self.db.get_file, owner, file_id)

    async def list_files(self, owner: str, purpose: str | None) -> list[FileRecord]:
        return await self.db.call(self.db.list_files, owner, purpose)

    async def delete_file(self, owner: str, file_id: str) -> bool:
        return await self.db.call(self.db.delete_file, owner, file_id)

    async def stored_bytes(self, owner: str) -> int:
        return await self.db.call(self.db.stored_bytes, owner)

    async def read_file(self, file_id: str) -> bytes:
        return await self.db.call(self.db.read_file, file_id)

    async def content(self, file_id: str) -> Path | bytes:
        return self.db.file_path(file_id)

    async def expire(self, now: float) -> list[str]:
        return await self.db.call(self.db.expire, now)

    async def put_batch(self, record: BatchRecord) -> None:
        await self.db.call(self.db.put_batch, record)

    async def update_batch(self, owner: str, batch_id: str,
                           change: Callable[[BatchRecord], None]) -> BatchRecord | None:
        return await self.db.call(self.db.update_batch, owner, batch_id, change)

    async def get_batch(self, owner: str, batch_id: str) -> BatchRecord | None:
        return await self.db.call(self.db.get_batch, owner, batch_id)

    async def list_batches(self, owner: str) -> list[BatchRecord]:
        return await self.db.call(self.db.list_batches, owner)

    async def open_batches(self, owner: str) -> int:
        return await self.db.call(self.db.open_batches, owner)

    async def unfinished(self) -> list[BatchRecord]:
        return await self.db.call(self.db.unfinished)

    async def record_line(self, record: BatchRecord, line: int, ok: bool,
                          result: dict[str, Any], prompt_tokens: int,
                          completion_tokens: int) -> bool:
        return await self.db.call(self.db.record_line, record, line, ok, result, prompt_tokens,
                                  completion_tokens)

    async def answered(self, batch_id: str) -> set[int]:
        return await self.db.call(self.db.answered, batch_id)

    async def results(self, batch_id: str) -> list[tuple[int, bool, bytes]]:
        return await self.db.call(lambda: list(self.db.results(batch_id)))

    async def finish_batch(self, record: BatchRecord,
                           files: list[tuple[FileRecord, Path]]) -> None:
        await self.db.call(self.db.finish_batch, record, files)

    async def lease(self, record: BatchRecord, me: str, now: float, seconds: float,
                    fresh: bool) -> BatchRecord | None:
        return record  # one server: always its own
