"""OpenAI's Files and Batch endpoints with plain arguments, over the store and the runner.

Every call names its `owner` (the SHA-256 of the caller's API key, "" without keys): a key sees,
reads, deletes and cancels only its own files and batches; another key's id reads as unknown
(404), exactly like an id that never existed. Admin keys are no exception: a batch's answers
are its owner's data, as with stored Responses.

A batch is validated when it is created (lines.py, in a thread): it is stored as `in_progress`
(and handed to the runner) or as `failed` with its `errors`; it never waits in `validating`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmrelay.api.access import ANONYMOUS, allowed_models
from llmrelay.api.batch.lines import ENDPOINTS, error, validate
from llmrelay.api.batch.runner import LEASE, BatchRunner
from llmrelay.api.batch.state import (
    UPLOAD_PURPOSES,
    BatchLimits,
    BatchRecord,
    FileRecord,
    check_metadata,
    new_id,
)
from llmrelay.api.batch.storage import Store
from llmrelay.api.errors import APIError, bad_param
from llmrelay.api.keys import Key
from llmrelay.api.table import WorkerTable

MAX_LIST = 10_000


def no_file(file_id: str, param: str = "file_id") -> APIError:
    return APIError(404, f"No such File object: {file_id[:100]}", param=param, code="not_found")


def no_batch(batch_id: str) -> APIError:
    return APIError(404, f"No batch found with id '{batch_id[:100]}'.", param="batch_id",
                    code="not_found")


def page(objects: list[dict[str, Any]], after: str | None, limit: str | None,
         default: int) -> dict[str, Any]:
    """OpenAI's cursor list: the objects after the one with id `after`, at most `limit`."""
    try:
        n = default if limit is None else int(limit)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_LIST:
        raise bad_param("limit", f"limit must be a whole number from 1 to {MAX_LIST}.")
    if after is not None:
        ids = [o["id"] for o in objects]
        objects = objects[ids.index(after) + 1:] if after in ids else []
    data = objects[:n]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(objects) > n}


class FileServing:
    def __init__(self, store: Store, runner: BatchRunner, limits: BatchLimits,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.runner = runner
        self.limits = limits
        self.clock = clock

    async def create(self, owner: str, filename: str, purpose: str, staged: Path,
                     size: int, expires_after: Any = None) -> dict[str, Any]:
        """A file uploaded to `staged` (removed if refused) becomes a stored file;
        `expires_after` as OpenAI's (`{"anchor": "created_at", "seconds": N}`)."""
        try:
            if purpose not in UPLOAD_PURPOSES:
                raise bad_param("purpose", f"Invalid value for 'purpose': '{purpose[:40]}'; "
                                f"supported: {', '.join(UPLOAD_PURPOSES)}.")
            seconds = self.limits.expiry(expires_after, "expires_after")
            stored = await self.store.stored_bytes(owner)
            self.limits.check_upload(size, stored)
            now = int(self.clock())
            record = FileRecord(new_id("file-"), owner, filename[:255] or "upload", purpose,
                                size, now, None if seconds is None else now + seconds)
            await self.store.add_file(record, staged)
        finally:
            staged.unlink(missing_ok=True)
        return record.to_object()

    async def get(self, owner: str, file_id: str) -> FileRecord:
        record = await self.store.get_file(owner, file_id)
        if record is None or record.gone(self.clock()):
            raise no_file(file_id)
        return record

    async def retrieve(self, owner: str, file_id: str) -> dict[str, Any]:
        return (await self.get(owner, file_id)).to_object()

    async def content(self, owner: str, file_id: str) -> Path | bytes:
        await self.get(owner, file_id)
        return await self.store.content(file_id)

    async def list(self, owner: str, purpose: str | None, after: str | None, limit: str | None,
                   order: str | None) -> dict[str, Any]:
        if order not in (None, "asc", "desc"):
            raise bad_param("order", "order must be 'asc' or 'desc'.")
        now = self.clock()
        files = [f.to_object() for f in await self.store.list_files(owner, purpose)
                 if not f.gone(now)]
        if order != "asc":
            files.reverse()
        return page(files, after, limit, MAX_LIST)

    async def delete(self, owner: str, file_id: str) -> dict[str, Any]:
        if any(r.input_file_id == file_id and r.owner == owner
               for r in await self.store.unfinished()):
            raise APIError(409, f"The file {file_id} is the input of a batch that is still "
                           "running; cancel the batch or wait for it to end.",
                           param="file_id", code="file_in_use")
        if not await self.store.delete_file(owner, file_id):
            raise no_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}


class BatchServing:
    def __init__(self, store: Store, runner: BatchRunner, table: WorkerTable,
                 limits: BatchLimits, clock: Callable[[], float]) -> None:
        self.store = store
        self.runner = runner
        self.table = table
        self.limits = limits
        self.clock = clock

    async def create(self, owner: str, key: Key | None, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise bad_param("endpoint", f"Invalid value for 'endpoint': '{str(endpoint)[:60]}'; "
                            f"supported: {', '.join(ENDPOINTS)}.", "unsupported_value")
        window = str(body.get("completion_window"))
        seconds = self.limits.window(window)
        metadata = check_metadata(body.get("metadata"))
        output_expiry = self.limits.expiry(body.get("output_expires_after"),
                                           "output_expires_after")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise bad_param("input_file_id", "input_file_id must be a file's id.")
        source = await self.store.get_file(owner, file_id)
        if source is None or source.gone(self.clock()):
            raise no_file(file_id, "input_file_id")
        if source.purpose != "batch":
            raise bad_param("input_file_id", f"The file {file_id} was uploaded with purpose "
                            f"'{source.purpose}'; a batch's input needs purpose 'batch'.")
        self.limits.check_open(await self.store.open_batches(owner))
        now = self.clock()
        rec = BatchRecord(new_id("batch_"), owner, key.name if key is not None else ANONYMOUS,
                          endpoint, file_id, window, int(now), int(now + seconds),
                          metadata=metadata, output_expires_after=output_expiry)
        data = await self.store.read_file(file_id)
        checked = await asyncio.to_thread(validate, data, endpoint)
        errors = checked.errors
        if checked.model is not None and checked.lines:
            try:
                self.table.check_model(checked.model, allowed_models(key))
            except APIError as e:
                errors = [*errors, error(e.code or "model_not_found", e.message,
                                         checked.lines[0].number, "body.model")]
        if errors:
            rec.fail(errors, self.clock())
        else:
            rec.start(len(checked.lines), checked.model, self.clock())
            if self.store.shared:  # this server runs it, under a lease (runner.py)
                rec.runner, rec.lease_until = self.runner.me, self.clock() + LEASE
        await self.store.put_batch(rec)
        if not errors:
            self.runner.launch(rec)
        return rec.to_object()

    async def get(self, owner: str, batch_id: str) -> BatchRecord:
        rec = self.runner.records.get(batch_id)
        if rec is None or rec.owner != owner:
            rec = await self.store.get_batch(owner, batch_id)
        if rec is None:
            raise no_batch(batch_id)
        return rec

    async def retrieve(self, owner: str, batch_id: str) -> dict[str, Any]:
        return (await self.get(owner, batch_id)).to_object()

    async def list(self, owner: str, after: str | None, limit: str | None) -> dict[str, Any]:
        batches = await self.store.list_batches(owner)
        running = self.runner.records
        return page([(running.get(b.id) or b).to_object() for b in batches], after, limit, 20)

    async def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        rec = await self.get(owner, batch_id)
        return (await self.runner.cancel(rec)).to_object()
