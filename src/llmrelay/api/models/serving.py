"""The served model names, from the API server's worker table, and the models declared for
loading on demand (with their state on their host); an API key with a model list sees only the
models it may use (`allowed`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from llmrelay.api.errors import APIError
from llmrelay.api.models.protocol import DownloadingModel, Model, ModelList
from llmrelay.api.table import WorkerTable
from llmrelay.ondemand.view import Declared

# Features in the order they are listed; a FastChat worker honours the first two.
FEATURES = ("chat", "completions", "logprobs", "seed", "penalties", "prompt_token_ids",
            "tools", "json_schema", "logit_bias", "embeddings", "reasoning", "vision")


class ModelServing:
    def __init__(self, table: WorkerTable,
                 declared: Callable[[], Mapping[str, Declared]] | None = None) -> None:
        self.table = table
        self.declared = declared or dict

    def _all(self) -> dict[str, Model]:
        models = self.table.models()
        out = {m: self.model(m, t) for m, t in models.items()}
        for name, d in self.declared().items():
            # Served by a worker that is not its host's (one always loaded): loaded.
            elsewhere = any(w.name != d.address for w in self.table.serving(name))
            if d.state == "downloading" and not elsewhere:
                out[name] = self.fetching(name, d.since, d.download)
                continue
            model = out.get(name) or self.model(name, d.since)
            model.state = "loaded" if elsewhere else d.state
            out[name] = model
        for name, progress in self.table.downloading().items():
            if name not in out:  # a worker fetching its model (no other worker serves it)
                out[name] = self.fetching(name, time.time(), progress)
        return out

    def fetching(self, name: str, created: float, progress: dict | None) -> DownloadingModel:
        return DownloadingModel(id=name, created=int(created), features=[], download=progress)

    def model(self, name: str, created: float) -> Model:
        """A model with what at least one of its workers honours (requests are routed to one
        that honours what they ask)."""
        have: set[str] = set()
        context = 0
        reasoning = None
        for w in self.table.serving(name):
            f = w.features
            if f is None:  # FastChat's worker: text in, text out
                have.update(("chat", "completions"))
                continue
            have.update(k for k in FEATURES if getattr(f, k, False))
            reasoning = reasoning or getattr(f, "reasoning", None) or None
            if w.ours is not None:
                context = max(context, w.ours.context_length)
        return Model(id=name, created=int(created), features=[k for k in FEATURES if k in have],
                     context_length=context, reasoning=reasoning)

    def list(self, allowed: Callable[[str], bool] | None = None) -> ModelList:
        models = self._all()
        return ModelList(data=[models[m] for m in sorted(models)
                               if allowed is None or allowed(m)])

    def get(self, model: str, allowed: Callable[[str], bool] | None = None) -> Model:
        models = self._all()
        if model not in models or (allowed is not None and not allowed(model)):
            self.table.check_model(model, allowed)  # raises the 404 (or 503) with the names
            raise APIError(404, f"The model '{model}' does not exist.", param="model",
                           code="model_not_found")
        return models[model]
