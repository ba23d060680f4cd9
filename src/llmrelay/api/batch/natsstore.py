"""Files and batches in the NATS registry's JetStream (`--registry`), so that every API server on
it serves every file and batch and any of them finishes a batch whose server died.

- The files' bytes: an object store, `<bucket>-files` (object name: the file's id).
- The rows: a key-value bucket, `<bucket>-batches`, history 1:
  `file.<owner>.<id>` (a FileRecord), `batch.<owner>.<id>` (a BatchRecord), `open.<id>` (the
  owner of each batch not yet ended: what a server scans to take batches over) and
  `line.<batch>.<n>` (an answered line: its output line, status and tokens). The owner in a
  key (a SHA-256 of the owner, itself the API key's hash) makes another key's id simply
  absent.
- Exactly once: a line is written with `create` (it fails if the line exists), then the
  batch's counts with compare-and-set; a server taking the batch over (`lease`, `fresh`)
  recounts from the lines, so a crash between the two writes loses no count.
- Leases: the batch record names its `runner` (an API server's address) and `lease_until`;
  the runner renews it every few seconds and another server takes over a batch whose lease
  has lapsed (compare-and-set: one of them wins). Leases compare wall clocks: the API servers'
  clocks must agree within a second or so (NTP).

Both buckets are created by whoever comes first, with the registry's replicas (R3 on a cluster
of 3 or more servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmrelay.api.batch.state import TERMINAL, BatchRecord, FileRecord
from llmrelay.api.errors import APIError
from llmrelay.protocol import dumps, loads
from llmrelay.registry.base import RegistryConfig
from llmrelay.registry.natskv import cluster_size, connect_until_done

log = logging.getLogger("llmrelay.api")

TIMEOUT = 10.0  # a JetStream call (an object's chunk, a put)


def _owner(owner: str) -> str:
    """An owner as a key's token: its SHA-256 in hex (owners hold `:`, which keys may not)."""
    return hashlib.sha256(owner.encode()).hexdigest()


class NatsStore:
    """`storage.Store` on the registry's NATS (see the module docstring). `staging_dir`: where
    uploads and outputs are written before they go to the object store."""

    shared = True

    def __init__(self, cfg: RegistryConfig, staging_dir: Path, name: str) -> None:
        self.cfg = cfg
        self.staging_dir = staging_dir
        self.name = name
        self.kv: Any = None
        self.obs: Any = None
        self.nc: Any = None
        self.js: Any = None
        self.rows = f"{cfg.bucket}-batches"
        self._opening: asyncio.Task[None] | None = None

    # ---- connection ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect in the background (retrying, as the registry feed does): until connected,
        every call is a 503 and the API server serves all else."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        if self._opening is None:
            self._opening = asyncio.create_task(self._connect(), name="files and batches")

    def _need(self) -> None:
        if self.obs is None:
            raise APIError(503, "Files and batches are not reachable yet: this API server has "
                           "no connection to the registry's NATS (see its log).",
                           type="server_error", code="store_unavailable")

    async def _connect(self) -> None:
        nc = self.nc = await connect_until_done(self.cfg, self.name, "files and batches")
        self.js = nc.jetstream(timeout=TIMEOUT)
        while True:
            try:
                await self._buckets(nc)
                return
            except Exception as e:  # JetStream not ready yet (no meta leader), no permission
                log.warning("files and batches: the NATS buckets cannot be opened yet (%s: %s); "
                            "retrying in 2 s", type(e).__name__, e)
                await asyncio.sleep(2.0)

    async def _buckets(self, nc: Any) -> None:
        """Open both buckets, creating those missing."""
        from nats.js.api import ObjectStoreConfig
        from nats.js.errors import BucketNotFoundError

        replicas = self.cfg.replicas or (3 if cluster_size(nc) >= 3 else 1)
        rows, objects = self.rows, f"{self.cfg.bucket}-files"
        try:
            self.kv = await self.js.key_value(rows)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(
                bucket=rows, history=1, replicas=replicas,
                description="llmrelay files and batches (rows)")
        try:
            obs = await self.js.object_store(objects)
        except BucketNotFoundError:
            obs = await self.js.create_object_store(objects, config=ObjectStoreConfig(
                replicas=replicas, description="llmrelay files (bytes)"))
        self.obs = obs  # (set last: the store is usable from now on)
        log.info("files and batches in the NATS buckets %r and %r", rows, objects)

    async def aclose(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(BaseException):
                await self._opening
        if self.nc is not None:
            await self.nc.close()

    # ---- rows --------------------------------------------------------------------------------

    async def _values(self, pattern: str) -> list[Any]:
        """Every live entry whose key matches `pattern` (a subject wildcard)."""
        self._need()
        watcher = await self.kv.watch(pattern, ignore_deletes=True)
        entries = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value:
                    entries.append(entry)
        finally:
            await watcher.stop()
        return entries

    async def _get(self, key: str) -> Any:
        from nats.js.errors import KeyNotFoundError

        self._need()
        try:
            return await self.kv.get(key)
        except KeyNotFoundError:
            return None

    # ---- files -------------------------------------------------------------------------------

    def staging(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.staging_dir, prefix=".upload-")
        os.close(fd)
        return Path(name)

    async def add_file(self, record: FileRecord, staged: Path) -> None:
        """The bytes into the object store first, then the row."""
        self._need()
        with open(staged, "rb") as f:
            await self.obs.put(record.id, f)
        staged.unlink(missing_ok=True)
        await self.kv.put(f"file.{_owner(record.owner)}.{record.id}", dumps(vars(record)))

    async def get_file(self, owner: str, file_id: str) -> FileRecord | None:
        if not file_id.replace("-", "").replace("_", "").isalnum():
            return None  # not a key this bucket can hold
        entry = await self._get(f"file.{_owner(owner)}.{file_id}")
        return None if entry is None else FileRecord(**loads(entry.value))

    async def list_files(self, owner: str, purpose: str | None) -> list[FileRecord]:
        files = [FileRecord(**loads(e.value)) for e in await self._values(
            f"file.{_owner(owner)}.*")]
        files.sort(key=lambda f: (f.created_at, f.id))
        return [f for f in files if not purpose or f.purpose == purpose]

    async def delete_file(self, owner: str, file_id: str) -> bool:
        from nats.js.errors import NotFoundError

        if await self.get_file(owner, file_id) is None:
            return False
        await self.kv.delete(f"file.{_owner(owner)}.{file_id}")
        try:
            await self.obs.delete(file_id)
        except NotFoundError:
            pass
        return True

    async def stored_bytes(self, owner: str) -> int:
        return sum(f.bytes for f in await self.list_files(owner, None))

    async def read_file(self, file_id: str) -> bytes:
        self._need()
        return bytes((await self.obs.get(file_id)).data)

    async def content(self, file_id: str) -> Path | bytes:
        return await self.read_file(file_id)

    async def expire(self, now: float) -> list[str]:
        gone = []
        for entry in await self._values("file.*.*"):
            f = FileRecord(**loads(entry.value))
            if f.gone(now):
                await self.delete_file(f.owner, f.id)
                gone.append(f.id)
        return gone

    # ---- batches -----------------------------------------------------------------------------

    @staticmethod
    def _key(owner: str, batch_id: str) -> str:
        return f"batch.{_owner(owner)}.{batch_id}"

    async def put_batch(self, record: BatchRecord) -> None:
        self._need()
        await self.kv.put(self._key(record.owner, record.id), dumps(record.to_json()))
        if record.status not in TERMINAL:
            await self.kv.put(f"open.{record.id}", dumps({"owner": record.owner}))

    async def update_batch(self, owner: str, batch_id: str,
                           change: Callable[[BatchRecord], None]) -> BatchRecord | None:
        """Compare-and-set: read, `change`, write if nobody wrote since, else again."""
        from nats.js.errors import KeyWrongLastSequenceError

        key = self._key(owner, batch_id)
        while True:
            entry = await self._get(key)
            if entry is None:
                return None
            record = BatchRecord.from_json(loads(entry.value))
            change(record)
            try:
                await self.kv.update(key, dumps(record.to_json()), last=entry.revision)
                return record
            except KeyWrongLastSequenceError:
                continue

    async def get_batch(self, owner: str, batch_id: str) -> BatchRecord | None:
        if not batch_id.replace("_", "").isalnum():
            return None
        entry = await self._get(self._key(owner, batch_id))
        return None if entry is None else BatchRecord.from_json(loads(entry.value))

    async def list_batches(self, owner: str) -> list[BatchRecord]:
        batches = [BatchRecord.from_json(loads(e.value))
                   for e in await self._values(f"batch.{_owner(owner)}.*")]
        batches.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        return batches

    async def _open(self) -> list[tuple[str, str]]:
        """(batch id, owner) of every batch not yet ended."""
        return [(e.key.split(".", 1)[1], loads(e.value)["owner"])
                for e in await self._values("open.*")]

    async def open_batches(self, owner: str) -> int:
        return sum(o == owner for _, o in await self._open())

    async def unfinished(self) -> list[BatchRecord]:
        found = []
        for batch_id, owner in await self._open():
            record = await self.get_batch(owner, batch_id)
            if record is None or record.status in TERMINAL:
                await self.kv.delete(f"open.{batch_id}")
            else:
                found.append(record)
        found.sort(key=lambda b: (b.created_at, b.id))
        return found

    async def lease(self, record: BatchRecord, me: str, now: float, seconds: float,
                    fresh: bool) -> BatchRecord | None:
        taken = False

        def take(stored: BatchRecord) -> None:
            nonlocal taken
            taken = stored.status not in TERMINAL and (
                stored.runner in (None, me) or stored.lease_until <= now)
            if taken:
                stored.runner, stored.lease_until = me, now + seconds

        stored = await self.update_batch(record.owner, record.id, take)
        if stored is None or not taken:
            return None
        if fresh:  # counts as the answered lines say (a crash may have lost the last count)
            counts = BatchRecord(**{**stored.to_json(), "completed": 0, "failed": 0,
                                    "prompt_tokens": 0, "completion_tokens": 0})
            for entry in await self._values(f"line.{record.id}.*"):
                line = loads(entry.value)
                counts.count(line["ok"], line["prompt"], line["completion"])

            def recount(s: BatchRecord) -> None:
                s.completed, s.failed = counts.completed, counts.failed
                s.prompt_tokens, s.completion_tokens = counts.prompt_tokens, counts.completion_tokens

            stored = await self.update_batch(record.owner, record.id, recount) or stored
        return stored

    # ---- a running batch's lines -------------------------------------------------------------

    async def record_line(self, record: BatchRecord, line: int, ok: bool,
                          result: dict[str, Any], prompt_tokens: int,
                          completion_tokens: int) -> bool:
        from nats.js.errors import KeyWrongLastSequenceError

        self._need()
        value = dumps({"ok": ok, "prompt": prompt_tokens, "completion": completion_tokens,
                       "result": result})
        limit = self.nc.max_payload - 4096  # (room for the headers)
        if len(value) > limit:  # a NATS message cannot hold it: the line's answer says so
            ok = False
            value = dumps({"ok": ok, "prompt": prompt_tokens, "completion": completion_tokens,
                           "result": {**result, "response": None, "error": {
                               "code": "response_too_large", "message": (
                                   f"The answer ({len(value)} bytes) is larger than a message "
                                   f"of the NATS servers may be ({limit} bytes): it could not "
                                   "be stored.")}}})
        try:
            await self.kv.create(f"line.{record.id}.{line}", value)
        except KeyWrongLastSequenceError:
            return False
        stored = await self.update_batch(record.owner, record.id, lambda r: r.count(
            ok, prompt_tokens, completion_tokens))
        if stored is not None:
            record.adopt(stored)
        return True

    async def answered(self, batch_id: str) -> set[int]:
        return {int(e.key.rsplit(".", 1)[1]) for e in await self._values(f"line.{batch_id}.*")}

    async def results(self, batch_id: str) -> list[tuple[int, bool, bytes]]:
        rows = []
        for e in await self._values(f"line.{batch_id}.*"):
            line = loads(e.value)
            rows.append((int(e.key.rsplit(".", 1)[1]), bool(line["ok"]), dumps(line["result"])))
        rows.sort(key=lambda r: r[0])
        return rows

    async def finish_batch(self, record: BatchRecord,
                           files: list[tuple[FileRecord, Path]]) -> None:
        """The output files, then the batch's end (compare-and-set), then its lines go."""
        for f, staged in files:
            await self.add_file(f, staged)
        await self.update_batch(record.owner, record.id, lambda r: r.adopt(record))
        await self.kv.delete(f"open.{record.id}")
        await self.js.purge_stream(f"KV_{self.rows}", subject=f"$KV.{self.rows}.line.{record.id}.>")
