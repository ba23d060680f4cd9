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

MAX_INPUTS = 2048  # OpenAI's limit per request


async def embeddings(request: Request, body: EmbeddingRequest) -> Any:
    table: WorkerTable = request.app.state.table
    table.check_model(body.model)
    inputs = body.input
    if isinstance(inputs, str):
        inputs = [inputs]
    elif inputs and all(isinstance(t, int) for t in inputs):
        inputs = [inputs]  # one input as token ids
    if not inputs or not all(isinstance(t, str) or (isinstance(t, list) and t) for t in inputs):
        raise bad_param("input", "input must be a non-empty string, a list of strings, or a "
                        "list of non-empty token id arrays.")
    if len(inputs) > MAX_INPUTS:
        raise bad_param("input", f"At most {MAX_INPUTS} inputs per request; got {len(inputs)}.")
    worker = table.pick(body.model)
    if worker is None:
        raise APIError(503, f"No worker for '{body.model}' is available right now.",
                       type="server_error", headers={"Retry-After": "2"})
    ours = worker.status.get("llmrelay") or {}
    if not ours.get("embeddings", True):
        raise bad_param("model", f"The model '{body.model}' does not serve embeddings.",
                        "model_not_supported")
    if body.dimensions is not None:
        allowed = ours.get("embedding_dimensions") or []
        if body.dimensions not in allowed:
            sizes = ", ".join(map(str, allowed)) or "unknown"
            raise bad_param("dimensions", f"The model '{body.model}' does not support "
                            f"dimensions={body.dimensions}; it produces embeddings of "
                            f"{sizes} dimensions.", "unsupported_parameter")
    try:
        r = await until_disconnect(request, table.client.post(
            worker.name + "/worker_get_embeddings",
            json={"model": body.model, "input": inputs}))
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
