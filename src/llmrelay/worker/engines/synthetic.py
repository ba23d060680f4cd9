"""A synthetic engine for router benchmarks and fault tests only: it serves no model.

`--engine synthetic` (never chosen automatically) answers every generation at once with fixed
text, one word per token, `max_new_tokens` of them (16 when unlimited), so a benchmark measures
the HTTP layers in front of the worker and not a model. Its replies mean nothing; the worker
logs a warning saying so at start-up. Chat messages are rendered with the ChatML template, so
FastChat's API server can use the worker too (`/worker_get_conv_template`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmrelay.protocol import Features
from llmrelay.worker import templates
from llmrelay.worker.engines.base import Chunk, Engine, GenerationRequest, StopMatcher, context_overflow
from llmrelay.worker.models import ResolvedModel

log = logging.getLogger("llmrelay.worker")

WORDS = "The quick brown fox jumps over the lazy dog .".split()
CONTEXT_LENGTH = 8192
UNLIMITED_TOKENS = 16  # what a request without max_new_tokens gets


@dataclass
class Options:
    chat_template: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: ResolvedModel | None) -> Options:
        return cls(chat_template=args.chat_template)


def load(options: Options) -> SyntheticEngine:
    log.warning("--engine synthetic: this worker serves NO model and answers fixed text; "
                "it exists for router benchmarks and fault tests only")
    return SyntheticEngine(options.chat_template)


class SyntheticEngine(Engine):
    """Fixed text, streamed instantly; honours max_new_tokens, stop strings and echo."""

    name = "synthetic"

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = templates.choose(own=None, requested=chat_template or "chatml",
                                              architecture=None)

    def context_length(self) -> int:
        return CONTEXT_LENGTH

    async def count_tokens(self, text: str) -> int:
        return len(text.split())

    def features(self) -> Features:
        return Features(prompt_token_ids=True)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        if req.prompt_token_ids is not None:
            prompt, n_prompt = "", len(req.prompt_token_ids)
        else:
            prompt = self.render_chat(req.messages) if req.messages is not None else (
                req.prompt or "")
            n_prompt = len(prompt.split())
        if n_prompt >= CONTEXT_LENGTH:
            raise context_overflow(CONTEXT_LENGTH, n_prompt)
        if req.echo and prompt:
            yield Chunk(prompt, n_prompt, 0)
        wanted = UNLIMITED_TOKENS if req.max_new_tokens is None else req.max_new_tokens
        n = max(0, min(wanted, CONTEXT_LENGTH - n_prompt))
        stops = StopMatcher(list(req.stop))
        for i in range(n):
            text, hit = stops.feed(("" if i == 0 else " ") + WORDS[i % len(WORDS)])
            if hit:
                yield Chunk(text, n_prompt, i + 1, "stop", stop_sequence=stops.matched)
                return
            yield Chunk(text, n_prompt, i + 1)
        yield Chunk(stops.flush(), n_prompt, n, "length")
