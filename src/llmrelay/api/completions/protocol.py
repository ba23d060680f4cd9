"""OpenAI's legacy text completions: the request (validated with pydantic) and the responses
(dataclasses, written by `protocol.dumps`), whole and streamed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from llmrelay.api.protocol import MAX_N, ResponseHead, SamplingRequest, UsageInfo
from llmrelay.protocol import LegacyLogprobs


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    logit_bias: dict[str, Any] | None = None


@dataclass(kw_only=True)
class CompletionChoice:
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None = None


@dataclass(kw_only=True)
class Completion(ResponseHead):
    """A streamed answer's chunk (a whole answer has usage too: CompletionWithUsage)."""

    object: str = "text_completion"
    choices: list[CompletionChoice]


@dataclass(kw_only=True)
class CompletionWithUsage(Completion):
    """A whole answer, or the last chunk with `stream_options.include_usage` (no choices)."""

    usage: UsageInfo
