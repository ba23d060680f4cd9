"""The API server's routes, a few lines each over the serving objects: the OpenAI front doors
(guarded by the API keys when set), the operator's endpoints, the web chat page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from llmrelay.api.chat.protocol import ChatCompletionRequest
from llmrelay.api.chat.serving import ChatServing
from llmrelay.api.completions.protocol import CompletionRequest
from llmrelay.api.completions.serving import CompletionServing
from llmrelay.api.embeddings.protocol import EmbeddingRequest
from llmrelay.api.embeddings.serving import EmbeddingServing
from llmrelay.api.models.serving import ModelServing
from llmrelay.api.pipeline import respond
from llmrelay.metrics import ApiMetrics, metrics_response
from llmrelay.registry.base import TableFeed
from llmrelay.status import rows as status_rows

WEBUI = Path(__file__).parent / "webui"
# The chat page loads only its own files; model text is escaped before rendering, and this
# policy forbids inline scripts and handlers even if something slipped through.
WEBUI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def mount(app: FastAPI, guarded: list[Depends], feed: TableFeed, metrics: ApiMetrics,
          chat: ChatServing, completions: CompletionServing, embeddings: EmbeddingServing,
          models: ModelServing) -> None:
    """Add every route to `app`; `guarded` are the dependencies that check API keys."""
    table = feed.table

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> Any:
        return respond(models.list())

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def get_model(model: str) -> Any:
        return respond(models.get(model))

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        return respond(await chat.create(body, request.state.request_id, request.receive))

    @app.post("/v1/completions", dependencies=guarded)
    async def text_completions(request: Request, body: CompletionRequest) -> Any:
        return respond(await completions.create(body, request.state.request_id,
                                                request.receive))

    @app.post("/v1/embeddings", dependencies=guarded)
    async def create_embeddings(request: Request, body: EmbeddingRequest) -> Any:
        return respond(await embeddings.create(body, request.receive))

    @app.get("/metrics", dependencies=guarded)
    async def get_metrics() -> Any:
        return metrics_response(metrics.registry)

    @app.get("/api/workers", dependencies=guarded)
    async def api_workers() -> Any:
        """The worker table for the web page's operator view (as `llmrelay status` shows it):
        read from the controller now, else this server's last copy. Guarded by the API keys,
        since it shows internal addresses."""
        got = await feed.read()
        source, raw = got if got is not None else (
            "last copy (no controller reachable)", table.snapshot())
        out = status_rows(raw)
        for row in out:
            row["in_flight_here"] = table.inflight.get(row["address"], 0)
            if row["address"] in table.down:
                row["health"] = "refused connection"
        return {"source": source, "dispatch_method": raw.get("dispatch_method"),
                "heartbeat_interval": raw.get("heartbeat_interval"), "workers": out}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "controller_reachable": table.controller_ok,
                "workers": len(table.workers), "models": sorted(table.models())}

    @app.get("/", include_in_schema=False)
    async def webui_index() -> Any:
        return FileResponse(WEBUI / "index.html", headers=WEBUI_HEADERS)

    app.mount("/webui", StaticFiles(directory=WEBUI), name="webui")
