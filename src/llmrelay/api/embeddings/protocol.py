"""OpenAI's embeddings: the request (validated with pydantic) and the response (dataclasses,
written by `protocol.dumps`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


@dataclass(kw_only=True)
class Embedding:
    object: str = "embedding"
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64
    index: int


@dataclass(kw_only=True)
class EmbeddingUsage:
    prompt_tokens: int
    total_tokens: int


@dataclass(kw_only=True)
class EmbeddingList:
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
