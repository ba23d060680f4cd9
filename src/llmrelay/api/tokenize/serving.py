"""`/tokenize` and `/detokenize` for any served model: asked of a worker of the model whose
engine gives token ids (our workers' `/tokenize` and `/detokenize`), with failover through the
transport. A model none of whose workers can (FastChat's workers; an engine without a
tokenizer) is a 400 that says so."""

from __future__ import annotations

from typing import Any

from llmrelay.api.chat.protocol import normalize_messages, tool_constraints
from llmrelay.api.errors import APIError, bad_param
from llmrelay.api.observe import note_model
from llmrelay.api.table import Worker, WorkerTable
from llmrelay.api.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from llmrelay.api.transport import WorkerTransport
from llmrelay.protocol import EXT_TOKENIZE


def gives_tokens(worker: Worker) -> bool:
    features = worker.features
    return EXT_TOKENIZE in worker.extensions and features is not None and features.tokenize


class TokenServing:
    def __init__(self, table: WorkerTable, transport: WorkerTransport) -> None:
        self.table = table
        self.transport = transport

    def _admit(self, model: str) -> None:
        self.table.check_model(model)
        note_model(model)
        if not any(gives_tokens(w) for w in self.table.serving(model)):
            raise APIError(400, f"The model '{model}' does not offer token ids: none of its "
                           "workers' engines gives them (FastChat's workers do not).",
                           param="model", code="unsupported_model")

    async def _ask(self, model: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async def same(worker: Worker) -> dict[str, Any]:
            return body

        return await self.transport.ask(model, path, same, gives_tokens)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        prompt = body.prompt if body.prompt is not None else body.content
        if (prompt is None) == (body.messages is None):
            raise bad_param("prompt", "Give either 'prompt' (or 'content') or 'messages'.")
        self._admit(body.model)
        ask: dict[str, Any] = {"model": body.model}
        if body.messages is not None:
            ask["messages"] = normalize_messages(body.messages)
            ask.update(tool_constraints(body.tools, body.tool_choice, None).params())
        else:
            ask["prompt_token_ids" if isinstance(prompt, list) else "prompt"] = prompt
        data = await self._ask(body.model, "/tokenize", ask)
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise APIError(502, "The model worker's answer holds no tokens.", type="server_error")
        return TokenizeResponse(count=len(tokens), max_model_len=int(data.get("max_model_len")
                                                                     or 0), tokens=tokens)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._admit(body.model)
        data = await self._ask(body.model, "/detokenize", {"model": body.model,
                                                           "tokens": body.tokens})
        text = data.get("prompt")
        if not isinstance(text, str):
            raise APIError(502, "The model worker's answer holds no text.", type="server_error")
        return DetokenizeResponse(prompt=text, content=text)
