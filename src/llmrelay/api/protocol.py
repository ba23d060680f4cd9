"""OpenAI types the front doors share: the sampling fields of a generation request (validated
with pydantic, ranges as OpenAI documents them) and the usage of an answer.

Anything out of range is a 400 naming the parameter (see errors.py). Fields that OpenAI
defines for another endpoint (tools on text completions) or deprecated (`functions`) are
refused with a clear message rather than silently ignored. Responses are dataclasses that
`protocol.dumps` writes as they are (orjson writes dataclasses natively).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmrelay.api.errors import bad_param
from llmrelay.api.plan import Sampling

MAX_N = 16
MAX_STOP = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# A limit on generated tokens: no model reads two billion, and past 64 bits no worker could.
MAX_TOKENS = 2**31 - 1
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


class SamplingRequest(BaseModel):
    """What chat and completions requests share."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: int | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    max_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v < 1:
            raise ValueError("top_k must be -1 (off) or at least 1")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return [s for s in stops if s]  # an empty stop string would end every answer at once

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """400 for fields of other endpoints or of OpenAI's deprecated function calling."""
        extra = self.model_extra or {}
        for key in ("functions", "function_call"):
            if extra.get(key) not in (None, [], "none"):
                raise bad_param(key, f"'{key}' (the deprecated function calling) is not "
                                "supported: send 'tools' and 'tool_choice' instead.",
                                "unsupported_parameter")
        for key in ("tools", "tool_choice", "response_format"):
            if extra.get(key) not in (None, [], "none"):
                raise bad_param(key, f"'{key}' is served by /v1/chat/completions, not by this "
                                "endpoint.", "unsupported_parameter")


def sampling_of(body: SamplingRequest, max_new_tokens: int | None,
                logprobs: int | None) -> Sampling:
    """The sampling settings of a chat or completions request."""
    return Sampling.of(body.temperature, body.top_p, body.top_k, body.stop,
                       body.presence_penalty, body.frequency_penalty, body.repetition_penalty,
                       body.seed, max_new_tokens, logprobs)


# Responses are plain dataclasses, not slotted: orjson writes a slotted one about 6x slower (5-7
# us against about 1 us for a chunk), and every generated token goes through one.


@dataclass
class UsageInfo:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class ReasonedUsageInfo(UsageInfo):
    """The usage of an answer that reasoned: `{"reasoning_tokens": n}` in the details."""

    completion_tokens_details: dict[str, int] | None = None


@dataclass(kw_only=True)
class ResponseHead:
    """What every completion object and chunk starts with; `object` is set by each kind."""

    id: str
    object: str
    created: int
    model: str
