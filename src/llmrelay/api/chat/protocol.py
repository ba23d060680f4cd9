"""OpenAI's chat completions: the request (validated with pydantic) and the responses
(dataclasses, written by `protocol.dumps`), whole and streamed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from llmrelay.api.errors import bad_param
from llmrelay.api.protocol import ResponseHead, SamplingRequest, UsageInfo
from llmrelay.protocol import LogprobEntry

ROLES = {"system", "developer", "user", "assistant"}

# ---- the request --------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> plain {role, content: str} for a chat template; 400 on what we can't
    serve."""
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


# ---- the responses ------------------------------------------------------------------------------


@dataclass
class ChatLogprobs:
    content: list[LogprobEntry]


@dataclass(kw_only=True)
class ChatMessageOut:
    role: str = "assistant"
    content: str


@dataclass(kw_only=True)
class ChatChoice:
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


@dataclass(kw_only=True)
class ChatCompletion(ResponseHead):
    object: str = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


@dataclass(frozen=True)
class RoleDelta:
    """A choice's first chunk."""

    role: str = "assistant"
    content: str = ""


@dataclass
class ContentDelta:
    content: str


@dataclass(frozen=True)
class EndDelta:
    """A choice's last chunk, with its finish reason: `{}`."""


@dataclass(kw_only=True)
class ChunkChoice:
    index: int
    delta: RoleDelta | ContentDelta | EndDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


@dataclass(kw_only=True)
class ChatCompletionChunk(ResponseHead):
    object: str = "chat.completion.chunk"
    choices: list[ChunkChoice]


@dataclass(kw_only=True)
class ChatCompletionUsageChunk(ChatCompletionChunk):
    """The last chunk with `stream_options.include_usage`: no choices, the usage."""

    usage: UsageInfo
