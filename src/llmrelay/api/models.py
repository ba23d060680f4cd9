"""GET /v1/models and /v1/models/{id}: the served names, from the API server's worker table."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from llmrelay.api.errors import APIError
from llmrelay.api.routing import WorkerTable


def _model(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "llmrelay"}


async def list_models(request: Request) -> Any:
    table: WorkerTable = request.app.state.table
    models = table.models()
    return {"object": "list", "data": [_model(m, models[m]) for m in sorted(models)]}


async def get_model(request: Request, model: str) -> Any:
    table: WorkerTable = request.app.state.table
    models = table.models()
    if model not in models:
        table.check_model(model)  # raises the 404 (or 503) with the served names
        raise APIError(404, f"The model '{model}' does not exist.", param="model",
                       code="model_not_found")
    return _model(model, models[model])
