"""The API server's routes, a few lines each over the serving objects: the OpenAI front doors
(guarded by the API keys when set), the operator's endpoints (with keys on: admin keys only;
`/metrics` also for metrics-only keys; `/health` answers anyone, its details only to admins),
the API docs (guarded by the keys unless `public_docs`), the web chat page.

Every front door calls `access.enter(caller(request), model, table)` before serving: a model
the key may not use is a 404 as if it did not exist, a key at a limit gets a 429 (access.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.params import Depends
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from llmrelay.api.access import Access, allowed_models
from llmrelay.api.auth import authorization, caller, operator_guard
from llmrelay.api.chat.protocol import ChatCompletionRequest
from llmrelay.api.chat.serving import ChatServing
from llmrelay.api.completions.protocol import CompletionRequest
from llmrelay.api.completions.serving import CompletionServing
from llmrelay.api.embeddings.protocol import EmbeddingRequest
from llmrelay.api.embeddings.serving import EmbeddingServing
from llmrelay.api.messages.protocol import CountTokensRequest, MessagesRequest
from llmrelay.api.messages.serving import MessagesServing
from llmrelay.api.models.serving import ModelServing
from llmrelay.api.pipeline import respond
from llmrelay.api.plan import Caller
from llmrelay.api.responses.compact import CompactRequest
from llmrelay.api.responses.protocol import ResponsesRequest
from llmrelay.api.responses.serving import ResponsesServing, owner_of
from llmrelay.api.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from llmrelay.api.tokenize.serving import TokenServing
from llmrelay.metrics import ApiMetrics, metrics_response
from llmrelay.registry.base import TableFeed
from llmrelay.status import rows as status_rows

WEBUI = Path(__file__).parent / "webui"
MESSAGES = "/v1/messages"
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
          models: ModelServing, messages: MessagesServing, tokens: TokenServing,
          responses: ResponsesServing, access: Access, public_docs: bool = False) -> None:
    """Add every route to `app`; `guarded` are the dependencies that check API keys."""
    table = feed.table
    docs_guard = [] if public_docs else guarded

    @app.get("/openapi.json", dependencies=docs_guard, include_in_schema=False)
    async def openapi() -> Any:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=docs_guard, include_in_schema=False)
    async def swagger() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title + " - docs")

    @app.get("/redoc", dependencies=docs_guard, include_in_schema=False)
    async def redoc() -> Any:
        return get_redoc_html(openapi_url="/openapi.json", title=app.title + " - ReDoc")

    @app.get("/v1/models", dependencies=guarded)
    async def list_models(request: Request) -> Any:
        return respond(models.list(allowed_models(caller(request))))

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def get_model(request: Request, model: str) -> Any:
        return respond(models.get(model, allowed_models(caller(request))))

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        await access.enter(caller(request), body.model, table)
        return respond(await chat.create(body, request.state.request_id, request.receive,
                                         Caller.of(caller(request))))

    @app.post("/v1/completions", dependencies=guarded)
    async def text_completions(request: Request, body: CompletionRequest) -> Any:
        await access.enter(caller(request), body.model, table)
        return respond(await completions.create(body, request.state.request_id,
                                                request.receive, Caller.of(caller(request))))

    @app.post("/v1/embeddings", dependencies=guarded)
    async def create_embeddings(request: Request, body: EmbeddingRequest) -> Any:
        await access.enter(caller(request), body.model, table)
        return respond(await embeddings.create(body, request.receive))

    # Anthropic's Messages API (its errors in Anthropic's shape: app.py gives errors.install
    # the shape for these paths)
    @app.post(MESSAGES, dependencies=guarded)
    async def create_message(request: Request, body: MessagesRequest) -> Any:
        await access.enter(caller(request), body.model, table)
        return respond(await messages.create(body, request.state.request_id, request.receive,
                                             Caller.of(caller(request))))

    @app.post(MESSAGES + "/count_tokens", dependencies=guarded)
    async def count_message_tokens(request: Request, body: CountTokensRequest) -> Any:
        table.check_model(body.model, allowed_models(caller(request)))
        return respond(await messages.count_tokens(body))

    # vLLM's and llama.cpp's tokenizer endpoints (no generation: not counted against limits)
    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(request: Request, body: TokenizeRequest) -> Any:
        table.check_model(body.model, allowed_models(caller(request)))
        return respond(await tokens.tokenize(body))

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(request: Request, body: DetokenizeRequest) -> Any:
        table.check_model(body.model, allowed_models(caller(request)))
        return respond(await tokens.detokenize(body))

    def owner(request: Request) -> str:  # whose stored responses: the API key's hash
        return owner_of(authorization(request), keyed=bool(guarded))

    @app.post("/v1/responses", dependencies=guarded)
    async def create_response(request: Request, body: ResponsesRequest) -> Any:
        await access.enter(caller(request), body.model, table)
        return respond(await responses.create(body, request.state.request_id, owner(request),
                                              request.receive, Caller.of(caller(request))))

    @app.post("/v1/responses/compact", dependencies=guarded)
    async def compact_response(request: Request, body: CompactRequest) -> Any:
        await access.enter(caller(request), body.model, table)
        return respond(await responses.compact(body, request.state.request_id, owner(request),
                                               request.receive, Caller.of(caller(request))))

    def include(request: Request) -> list[str]:  # the SDK sends include[]=..., curl include=...
        return request.query_params.getlist("include") + request.query_params.getlist("include[]")

    @app.get("/v1/responses/{response_id}", dependencies=guarded)
    async def get_response(request: Request, response_id: str, stream: str | None = None) -> Any:
        return respond(await responses.retrieve(owner(request), response_id, include(request),
                                                stream))

    @app.delete("/v1/responses/{response_id}", dependencies=guarded)
    async def delete_response(request: Request, response_id: str) -> Any:
        return respond(await responses.delete(owner(request), response_id))

    @app.get("/v1/responses/{response_id}/input_items", dependencies=guarded)
    async def list_input_items(request: Request, response_id: str, after: str | None = None,
                               limit: str | None = None, order: str | None = None) -> Any:
        return respond(await responses.input_items(owner(request), response_id, after, limit,
                                                   order, include(request)))

    @app.get("/v1/usage", dependencies=guarded)
    async def get_usage(request: Request, since: str | None = Query(None),
                        key: str | None = Query(None)) -> Any:
        """Usage per day, key and model (admin keys only): `?since=YYYY-MM-DD&key=NAME`."""
        return await access.report(caller(request), since, key)

    @app.get("/metrics", dependencies=operator_guard(access, "the metrics", scrape=True))
    async def get_metrics() -> Any:
        return metrics_response(metrics.registry)

    @app.get("/api/workers", dependencies=operator_guard(access, "the workers"))
    async def api_workers() -> Any:
        """The worker table for the web page's operator view (as `llmrelay status` shows it):
        read from the controller now, else this server's last copy. With keys on, for admin
        keys only: it shows internal addresses and every model."""
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
    async def health(request: Request) -> Any:
        """Up or not for anyone; the details (controller, workers, models) only without keys
        or to an admin key."""
        if not access.is_operator(authorization(request)):
            return {"status": "ok"}
        return {"status": "ok", "controller_reachable": table.controller_ok,
                "workers": len(table.workers), "models": sorted(table.models())}

    @app.get("/", include_in_schema=False)
    async def webui_index() -> Any:
        return FileResponse(WEBUI / "index.html", headers=WEBUI_HEADERS)

    app.mount("/webui", StaticFiles(directory=WEBUI), name="webui")
