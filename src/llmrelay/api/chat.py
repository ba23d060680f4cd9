"""POST /v1/chat/completions: OpenAI chat, streamed or not, over our workers.

Our workers receive the `messages` and render them with the model's own template, and answer
with delta frames; FastChat's workers get a prompt rendered with their conversation template
and their cumulative frames are turned into deltas (fastchat_workers.py). This module shapes
the frames into OpenAI's chat objects and chunks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from llmrelay.api.errors import bad_param
from llmrelay.api.fastchat_workers import param_builder
from llmrelay.api.generation import (
    SSE_HEADERS,
    Opening,
    answer_all,
    merged,
    open_all,
    sse_stream,
    usage_of,
)
from llmrelay.api.routing import WorkerTable, now
from llmrelay.api.schemas import ChatCompletionRequest, normalize_messages
from llmrelay.dispatch import conversation_keys
from llmrelay.runtime import ClosingStreamingResponse, FastJSONResponse

DEFAULT_TEMPERATURE = 0.7


def sampling_params(body: Any, request_id: str) -> dict[str, Any]:
    """The worker params both endpoints share.

    The default temperature is FastChat's 0.7 rather than OpenAI's 1.0: small local models
    ramble at 1.0, and FastChat users expect 0.7.
    """
    return {
        "model": body.model,
        "temperature": DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": -1 if body.top_k is None else body.top_k,
        "stop": body.stop,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": body.repetition_penalty or 1.0,
        "seed": body.seed,
        "delta": True,
        "request_id": request_id,
    }


def per_choice(params: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """n copies; with a seed, each choice gets its own (seed, seed+1, ...) so they differ."""
    out = []
    for i in range(n):
        p = dict(params)
        if p.get("seed") is not None:
            p["seed"] = p["seed"] + i
        p["request_id"] = f"{params['request_id']}-{i}" if n > 1 else params["request_id"]
        out.append(p)
    return out


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
    table: WorkerTable = request.app.state.table
    request_id: str = request.state.request_id
    body.refuse_unsupported()
    table.check_model(body.model)
    messages = normalize_messages(body.messages)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_param("top_logprobs", "top_logprobs requires logprobs to be true.")
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling_params(body, request_id)
    params.update(
        messages=messages,
        max_new_tokens=max_tokens,
        echo=False,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    n = body.n or 1
    # Each choice's params are made for the worker picked: FastChat workers get a prompt.
    builders = [param_builder(table, p) for p in per_choice(params, n)]
    # `prefix` dispatch: the next turn goes where the conversation's KV cache is.
    keys = conversation_keys(messages) if table.dispatch_method == "prefix" else None
    base = {"id": f"chatcmpl-{request_id}", "created": now(), "model": body.model}

    if not body.stream:
        finals = await answer_all(request, table, body.model, builders, keys)
        choices = [{
            "index": i,
            "message": {"role": "assistant", "content": f.get("text", "")},
            "logprobs": {"content": (f.get("logprobs") or {}).get("content", [])}
            if body.logprobs else None,
            "finish_reason": _finish(f.get("finish_reason")),
        } for i, f in enumerate(finals)]
        return FastJSONResponse({**base, "object": "chat.completion", "choices": choices,
                                 "usage": usage_of(dict(enumerate(finals)), lambda i: 0)})

    opening = Opening(request, open_all(table, body.model, builders, keys))
    await opening.wait_briefly()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[list[dict[str, Any]]]:
        last: dict[int, dict[str, Any]] = {}
        # The role chunks go out with the first frames.
        out = [{**base, "object": "chat.completion.chunk", "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""},
             "logprobs": None, "finish_reason": None}]} for i in range(n)]
        async for frames in merged(opening.streams, opening.deadline):
            for i, f in frames:
                last[i] = f
                lp = f.get("logprobs")
                if f.get("text") or lp:
                    out.append({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": i, "delta": {"content": f.get("text", "")},
                         "logprobs": lp if body.logprobs else None, "finish_reason": None}]})
                if f.get("finish_reason"):
                    out.append({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": i, "delta": {}, "logprobs": None,
                         "finish_reason": _finish(f["finish_reason"])}]})
            yield out
            out = []
        if include_usage:
            out.append({**base, "object": "chat.completion.chunk", "choices": [],
                        "usage": usage_of(last, lambda i: 0)})
        yield out

    return ClosingStreamingResponse(sse_stream(chunks, opening), media_type="text/event-stream",
                                    headers=SSE_HEADERS, cleanup=opening.close_if_unused)


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"
