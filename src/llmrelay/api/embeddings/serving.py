"""Embeddings: checked here (inputs, the model's workers serve embeddings and the dimensions
asked for), computed by a worker through the transport (with failover and in-flight counting
like a generation), shaped into OpenAI's list."""

from __future__ import annotations

import base64
import struct
from typing import Any

from starlette.types import Receive

from llmrelay.api.embeddings.protocol import (
    MAX_INPUTS,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)
from llmrelay.api.errors import bad_param
from llmrelay.api.observe import note_model, note_usage
from llmrelay.api.pipeline import until_disconnect
from llmrelay.api.table import Worker, WorkerTable
from llmrelay.api.transport import WorkerTransport


def inputs_of(given: Any) -> list[Any]:
    """The request's input as a list of inputs (strings or token id lists); 400 if empty."""
    inputs = given
    if isinstance(inputs, str):
        inputs = [inputs]
    elif inputs and all(isinstance(t, int) for t in inputs):
        inputs = [inputs]  # one input as token ids
    if not inputs or not all(isinstance(t, str) or (isinstance(t, list) and t) for t in inputs):
        raise bad_param("input", "input must be a non-empty string, a list of strings, or a "
                        "list of non-empty token id arrays.")
    if len(inputs) > MAX_INPUTS:
        raise bad_param("input", f"At most {MAX_INPUTS} inputs per request; got {len(inputs)}.")
    return list(inputs)


class EmbeddingServing:
    def __init__(self, table: WorkerTable, transport: WorkerTransport) -> None:
        self.table = table
        self.transport = transport

    async def create(self, body: EmbeddingRequest, receive: Receive) -> EmbeddingList:
        self.table.check_model(body.model)
        note_model(body.model)
        inputs = inputs_of(body.input)
        workers = [w for w in self.table.serving(body.model) if w.serves_embeddings]
        if not workers:
            raise bad_param("model", f"The model '{body.model}' does not serve embeddings.",
                            "model_not_supported")
        dims = body.dimensions
        if dims is not None and not any(dims in w.embedding_dimensions for w in workers):
            sizes = ", ".join(map(str, sorted({d for w in workers
                                               for d in w.embedding_dimensions}))) or "unknown"
            raise bad_param("dimensions", f"The model '{body.model}' does not support "
                            f"dimensions={dims}; it produces embeddings of {sizes} dimensions.",
                            "unsupported_parameter")

        def accept(w: Worker) -> bool:
            return w.serves_embeddings and (dims is None or dims in w.embedding_dimensions)

        data = await until_disconnect(receive, self.transport.embed(
            body.model, {"model": body.model, "input": inputs}, accept))
        return self.response(body.model, data, body.encoding_format == "base64")

    @staticmethod
    def response(model: str, data: dict[str, Any], as_base64: bool) -> EmbeddingList:
        out = []
        for i, vec in enumerate(data["embedding"]):
            value: Any = vec
            if as_base64:
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            out.append(Embedding(embedding=value, index=i))
        tokens = int(data.get("token_num", 0))
        note_usage(tokens, 0)
        return EmbeddingList(data=out, model=model,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
