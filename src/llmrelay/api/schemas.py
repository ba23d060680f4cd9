"""OpenAI request types, validated with pydantic (ranges as OpenAI documents them).

Anything out of range is a 400 naming the parameter (see errors.py). Fields that OpenAI
defines but this server cannot honour (tools, response formats other than text) are refused
with a clear message rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmrelay.api.errors import bad_param

MAX_N = 16
MAX_STOP = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: int | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
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

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for key in ("tools", "functions", "tool_choice", "function_call"):
            if extra.get(key) not in (None, [], "none"):
                raise bad_param(key, f"'{key}' is not supported: this server has no function "
                                     "calling. Remove the field.", "unsupported_parameter")
        fmt = extra.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise bad_param("response_format", "Only response_format {'type': 'text'} is "
                            "supported.", "unsupported_parameter")
        if extra.get("logit_bias"):
            raise bad_param("logit_bias", "logit_bias is not supported.", "unsupported_parameter")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


ROLES = {"system", "developer", "user", "assistant"}


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> plain {role, content: str} for a chat template; 400 on what we can't serve."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if m.role in ("tool", "function"):
            raise bad_param(f"{param}.role", f"Role '{m.role}' is not supported: this server has "
                            "no function calling.", "unsupported_value")
        if m.role not in ROLES:
            raise bad_param(f"{param}.role", f"Invalid role '{m.role[:50]}'; expected one of "
                            "system, developer, user, assistant.")
        if m.content is None:
            raise bad_param(f"{param}.content", f"{param}.content must be a string or a list of "
                            "text parts, not null.")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_param(f"{param}.content[{j}]", f"Content part type '{part.type}' "
                                    "is not supported; only text parts are.", "unsupported_value")
                texts.append(part.text)
            content = "\n".join(texts)
        else:
            content = m.content
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content})
    return out
