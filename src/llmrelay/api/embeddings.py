"""POST /v1/embeddings: forwarded to a worker whose engine serves embeddings."""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
from fastapi import Request

from llmrelay.api.errors import APIError, bad_param, from_worker
from llmrelay.api.generation import until_disconnect
from llmrelay.api.routing import WorkerTable
from llmrelay.api.schemas import EmbeddingRequest


async def embeddings(request: Request, body: EmbeddingRequest) -> Any:
    table: WorkerTable = request.app.state.table
    table.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or not all(isinstance(t, str) for t in texts):
        raise bad_param("input", "input must be a non-empty string or list of strings.")
    if body.dimensions is not None:
        raise bad_param("dimensions", "This model does not support 'dimensions'.",
                        "unsupported_parameter")
    worker = table.pick(body.model)
    if worker is None:
        raise APIError(503, f"No worker for '{body.model}' is available right now.",
                       type="server_error", headers={"Retry-After": "2"})
    if not (worker.status.get("llmrelay") or {}).get("embeddings", True):
        raise bad_param("model", f"The model '{body.model}' does not serve embeddings.",
                        "model_not_supported")
    try:
        r = await until_disconnect(request, table.client.post(
            worker.name + "/worker_get_embeddings",
            json={"model": body.model, "input": texts}))
        data = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise APIError(502, f"The embedding worker failed ({type(e).__name__}).",
                       type="server_error") from e
    if "embedding" not in data:
        raise from_worker(int(data.get("error_code", 50001)), str(data.get("text", "")))
    out = []
    for i, vec in enumerate(data["embedding"]):
        value: Any = vec
        if body.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        out.append({"object": "embedding", "embedding": value, "index": i})
    tokens = int(data.get("token_num", 0))
    return {"object": "list", "data": out, "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
