"""OpenAI's model objects (dataclasses, written by `protocol.dumps`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class Model:
    id: str
    object: str = "model"
    created: int
    owned_by: str = "llmrelay"


@dataclass(kw_only=True)
class ModelList:
    object: str = "list"
    data: list[Model]
