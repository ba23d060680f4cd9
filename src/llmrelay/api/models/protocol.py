"""OpenAI's model objects (dataclasses, written by `protocol.dumps`).

`state` is ours: `loaded`, or for a model loaded on demand its state on its host (`loaded`,
`loading`, `unloading`, `unloaded`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class Model:
    id: str
    object: str = "model"
    created: int
    owned_by: str = "llmrelay"
    state: str = "loaded"


@dataclass(kw_only=True)
class ModelList:
    object: str = "list"
    data: list[Model]
