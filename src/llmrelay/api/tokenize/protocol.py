"""`/tokenize` and `/detokenize` as vLLM's server and llama.cpp's serve them: the requests
(validated with pydantic) and the answers (dataclasses).

`/tokenize` takes `{"model", "prompt"}` (llama.cpp's `content` is the same; `prompt` wins when
both are sent, as our openai engine does to ask either kind of server), a prompt as token
ids, or `{"model", "messages"}` (chat messages, OpenAI's shape, with `tools` and `tool_choice`:
rendered with the model's own template as for a generation) and answers `{"count",
"max_model_len", "tokens"}`. `/detokenize` takes `{"model", "tokens"}` and answers `{"prompt"}`
(vLLM's name; llama.cpp's `content` too). vLLM's switches (`add_special_tokens`,
`add_generation_prompt`, `return_token_strs`) are accepted and not applied: the ids are those a
generation of that prompt feeds the model (a text prompt with the model's BOS token, chat
messages with the generation prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmrelay.api.chat.protocol import ChatMessage, ChatTool


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str | list[int] | None = None
    content: str | None = None  # llama.cpp's name for the prompt
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    tokens: list[int]


@dataclass
class TokenizeResponse:
    count: int
    max_model_len: int
    tokens: list[int]


@dataclass
class DetokenizeResponse:
    prompt: str
    content: str  # the same text, by llama.cpp's name
