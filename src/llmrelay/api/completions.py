"""POST /v1/completions: OpenAI's legacy text completions (prompt strings or token ids)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from llmrelay.api.chat import _finish, per_choice, sampling_params
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
from llmrelay.api.schemas import CompletionRequest
from llmrelay.runtime import ClosingStreamingResponse, FastJSONResponse


def _prompts(prompt: Any) -> list[dict[str, Any]]:
    """A prompt in any of OpenAI's four forms -> worker fields, one dict per prompt."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": list(p)} for p in prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    raise bad_param("prompt", "prompt must be a string, a list of strings, or token ids, "
                    "and must not be empty.")


class _LegacyLogprobs:
    """Accumulates OpenAI's legacy completion logprobs from delta entries."""

    def __init__(self) -> None:
        self.data: dict[str, list[Any]] = {
            "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, entries: list[dict[str, Any]], offset: int,
            offsets: list[int] | None = None) -> dict[str, list[Any]]:
        """`offset`: where the first entry's token starts in the text; the others follow it,
        unless `offsets` gives each one's (a whole answer's, where an echoed prompt has none)."""
        chunk: dict[str, list[Any]] = {k: [] for k in self.data}
        for j, e in enumerate(entries):
            chunk["tokens"].append(e["token"])
            chunk["token_logprobs"].append(e["logprob"])
            chunk["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
            chunk["text_offset"].append(offsets[j] if offsets and j < len(offsets) else offset)
            offset += len(e["token"])
        for k in self.data:
            self.data[k].extend(chunk[k])
        return chunk


async def completions(request: Request, body: CompletionRequest) -> Any:
    table: WorkerTable = request.app.state.table
    request_id: str = request.state.request_id
    body.refuse_unsupported()
    table.check_model(body.model)
    if body.suffix:
        raise bad_param("suffix", "suffix (insertion) is not supported.", "unsupported_parameter")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise bad_param("best_of", "best_of must equal n (no server-side ranking).",
                        "unsupported_value")
    prompts = _prompts(body.prompt)
    params = sampling_params(body, request_id)
    params.update(max_new_tokens=16 if body.max_tokens is None else body.max_tokens,
                  echo=bool(body.echo), logprobs=body.logprobs)
    all_params = []
    for j, p in enumerate(prompts):
        base_p = {**params, **p, "request_id": f"{request_id}-p{j}" if len(prompts) > 1
                  else request_id}
        all_params.extend(per_choice(base_p, n))
    builders = [param_builder(table, p) for p in all_params]
    base = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": now(),
            "model": body.model}
    total = len(all_params)

    def prompt_of(i: int) -> int:
        return i // n

    if not body.stream:
        finals = await answer_all(request, table, body.model, builders)
        choices = []
        for i, f in enumerate(finals):
            lp = None
            if body.logprobs is not None:
                lp = _LegacyLogprobs()
                given = f.get("logprobs") or {}
                lp.add(given.get("content", []), 0, given.get("text_offset"))
            choices.append({"index": i, "text": f.get("text", ""),
                            "logprobs": lp.data if lp is not None else None,
                            "finish_reason": _finish(f.get("finish_reason"))})
        return FastJSONResponse({**base, "choices": choices,
                                 "usage": usage_of(dict(enumerate(finals)), prompt_of)})

    opening = Opening(request, open_all(table, body.model, builders))
    await opening.wait_briefly()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[list[dict[str, Any]]]:
        last: dict[int, dict[str, Any]] = {}
        offsets = [0] * total
        lps = [_LegacyLogprobs() for _ in range(total)]
        async for frames in merged(opening.streams, opening.deadline):
            out = []
            for i, f in frames:
                last[i] = f
                text = f.get("text", "")
                lp = None
                if body.logprobs is not None and f.get("logprobs"):
                    lp = lps[i].add(f["logprobs"]["content"], offsets[i])
                offsets[i] += len(text)
                if text or lp or f.get("finish_reason"):
                    reason = f.get("finish_reason")
                    out.append({**base, "choices": [{
                        "index": i, "text": text, "logprobs": lp,
                        "finish_reason": _finish(reason) if reason else None}]})
            yield out
        if include_usage:
            yield [{**base, "choices": [], "usage": usage_of(last, prompt_of)}]

    return ClosingStreamingResponse(sse_stream(chunks, opening), media_type="text/event-stream",
                                    headers=SSE_HEADERS, cleanup=opening.close_if_unused)
