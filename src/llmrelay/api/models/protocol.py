"""OpenAI's model objects (dataclasses, written by `protocol.dumps`).

`state` is ours: `loaded`, or for a model loaded on demand its state on its host (`loaded`,
`loading`, `unloading`, `unloaded`), or `downloading` while a model named on the hub is fetched
(a `DownloadingModel`, with its progress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True)
class Model:
    id: str
    object: str = "model"
    created: int
    owned_by: str = "llmrelay"
    # Ours: what the model's workers honour (a request for anything else is a 400), and the
    # context length of its workers (0: not known); `state` of a model loaded on demand
    # (loaded, loading, unloaded, ...; docs/on-demand.md).
    features: list[str]
    context_length: int = 0
    state: str = "loaded"
    reasoning: str | None = None  # a reasoning model's parser (deepseek_r1, qwen3, gpt_oss)


@dataclass(kw_only=True)
class DownloadingModel(Model):
    """A model still being fetched from the hub: `download` is its progress (done_bytes,
    total_bytes, percent), as its worker or host last reported it."""

    state: str = "downloading"
    download: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ModelList:
    object: str = "list"
    data: list[Model]
