"""A synthetic engine for router benchmarks and fault tests only: it serves no model.

`--engine synthetic` (never chosen automatically) answers every generation at once with fixed
text, one word per token, `max_new_tokens` of them (16 when unlimited), so a benchmark measures
the HTTP layers in front of the worker and not a model. Its replies mean nothing; the worker
logs a warning saying so at start-up. Chat messages are rendered with the ChatML template, so
FastChat's API server can use the worker too (`/worker_get_conv_template`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from llmrelay.worker import templates
from llmrelay.worker.engines.base import Chunk, Engine, EngineError, GenerationRequest, StopMatcher

WORDS = "The quick brown fox jumps over the lazy dog .".split()
CONTEXT_LENGTH = 8192
UNLIMITED_TOKENS = 16  # what a request without max_new_tokens gets


class SyntheticEngine(Engine):
    """Fixed text, streamed instantly; honours max_new_tokens, stop strings, echo and cancel."""

    name = "synthetic"

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = templates.choose(own=None, requested=chat_template or "chatml",
                                              architecture=None)

    def context_length(self) -> int:
        return CONTEXT_LENGTH

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, req: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        if req.prompt_token_ids is not None:
            prompt, n_prompt = "", len(req.prompt_token_ids)
        else:
            prompt = self.render_chat(req.messages) if req.messages is not None else (
                req.prompt or "")
            n_prompt = self.count_tokens(prompt)
        if n_prompt >= CONTEXT_LENGTH:
            raise EngineError(f"This model's maximum context length is {CONTEXT_LENGTH} tokens. "
                              f"However, your prompt has {n_prompt} tokens.", 40303)
        if req.echo and prompt:
            yield Chunk(prompt, n_prompt, 0)
        wanted = UNLIMITED_TOKENS if req.max_new_tokens is None else req.max_new_tokens
        stops = StopMatcher(list(req.stop))
        for i in range(min(wanted, CONTEXT_LENGTH - n_prompt)):
            if cancel.is_set():
                yield Chunk(stops.flush(), n_prompt, i, "abort")
                return
            text, hit = stops.feed(("" if i == 0 else " ") + WORDS[i % len(WORDS)])
            if hit:
                yield Chunk(text, n_prompt, i + 1, "stop")
                return
            yield Chunk(text, n_prompt, i + 1)
        yield Chunk(stops.flush(), n_prompt, max(0, min(wanted, CONTEXT_LENGTH - n_prompt)),
                    "length")

    def info(self) -> dict[str, Any]:
        return {"synthetic": True}
