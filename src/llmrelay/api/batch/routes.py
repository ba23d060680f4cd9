"""The Files and Batch routes, a few lines each over serving.py: `/v1/files` (upload as
multipart/form-data, list, retrieve, content, delete) and `/v1/batches` (create, list, retrieve,
cancel), guarded by the API keys like the other front doors. An upload is streamed to disk
(its own size limit, `--files-max-mb`, instead of `--max-request-bytes`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData, UploadFile

from llmrelay.api.auth import authorization, caller
from llmrelay.api.batch.serving import BatchServing, FileServing
from llmrelay.api.body import CheckedRoute
from llmrelay.api.errors import bad_param
from llmrelay.api.pipeline import respond
from llmrelay.api.responses.serving import owner_of

CHUNK = 1024 * 1024


def expires_after(form: FormData) -> Any:
    """An upload's `expires_after` as the SDK sends it in a form (`expires_after[anchor]`,
    `expires_after[seconds]`), as its JSON would be; None when absent."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    return {"anchor": anchor,
            "seconds": int(seconds) if isinstance(seconds, str) and seconds.isdigit() else seconds}


def mount(app: FastAPI, guarded: list[Depends], files: FileServing,
          batches: BatchServing) -> None:
    router = APIRouter(route_class=CheckedRoute, dependencies=guarded)

    def owner(request: Request) -> str:  # whose files and batches: the API key's hash
        return owner_of(authorization(request), keyed=bool(guarded))

    async def upload(request: Request) -> Any:
        form = await request.form(max_files=1, max_fields=8)
        try:
            file, purpose = form.get("file"), form.get("purpose")
            if not isinstance(file, UploadFile):
                raise bad_param("file", "Missing required parameter: 'file' (multipart/form-data "
                                "with the file's bytes).", None)
            if not isinstance(purpose, str):
                raise bad_param("purpose", "Missing required parameter: 'purpose'.", None)
            staged = files.store.staging()
            size = 0
            with open(staged, "wb") as out:
                while chunk := await file.read(CHUNK):
                    size += len(chunk)
                    if size > files.limits.max_file_bytes:
                        break  # create() refuses it by its size
                    out.write(chunk)
            return respond(await files.create(owner(request), file.filename or "upload",
                                              purpose, staged, size, expires_after(form)))
        finally:
            await form.close()

    # not a JSON body: no CheckedRoute (which reads the whole body as JSON text)
    router.add_api_route("/v1/files", upload, methods=["POST"], route_class_override=APIRoute)

    @router.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                         limit: str | None = None, order: str | None = None) -> Any:
        return respond(await files.list(owner(request), purpose, after, limit, order))

    @router.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> Any:
        return respond(await files.retrieve(owner(request), file_id))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Any:
        content = await files.content(owner(request), file_id)
        if isinstance(content, bytes):  # from NATS object storage
            return Response(content, media_type="application/octet-stream")
        return FileResponse(content, media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Any:
        return respond(await files.delete(owner(request), file_id))

    @router.post("/v1/batches")
    async def create_batch(request: Request, body: dict[str, Any]) -> Any:
        return respond(await batches.create(owner(request), caller(request), body))

    @router.get("/v1/batches")
    async def list_batches(request: Request, after: str | None = None,
                           limit: str | None = None) -> Any:
        return respond(await batches.list(owner(request), after, limit))

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str) -> Any:
        return respond(await batches.retrieve(owner(request), batch_id))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Any:
        return respond(await batches.cancel(owner(request), batch_id))

    app.include_router(router)
