"""The served model names, from the API server's worker table; an API key with a model list
sees only the models it may use (`allowed`)."""

from __future__ import annotations

from collections.abc import Callable

from llmrelay.api.errors import APIError
from llmrelay.api.models.protocol import Model, ModelList
from llmrelay.api.table import WorkerTable

# Features in the order they are listed; a FastChat worker honours the first two.
FEATURES = ("chat", "completions", "logprobs", "seed", "penalties", "prompt_token_ids",
            "tools", "json_schema", "logit_bias", "embeddings")


class ModelServing:
    def __init__(self, table: WorkerTable) -> None:
        self.table = table

    def model(self, name: str, created: float) -> Model:
        """A model with what at least one of its workers honours (requests are routed to one
        that honours what they ask)."""
        have: set[str] = set()
        context = 0
        for w in self.table.serving(name):
            f = w.features
            if f is None:  # FastChat's worker: text in, text out
                have.update(("chat", "completions"))
                continue
            have.update(k for k in FEATURES if getattr(f, k, False))
            if w.ours is not None:
                context = max(context, w.ours.context_length)
        return Model(id=name, created=int(created), features=[k for k in FEATURES if k in have],
                     context_length=context)

    def list(self, allowed: Callable[[str], bool] | None = None) -> ModelList:
        models = self.table.models()
        return ModelList(data=[self.model(m, models[m]) for m in sorted(models)
                               if allowed is None or allowed(m)])

    def get(self, model: str, allowed: Callable[[str], bool] | None = None) -> Model:
        models = self.table.models()
        if model not in models or (allowed is not None and not allowed(model)):
            self.table.check_model(model, allowed)  # raises the 404 (or 503) with the names
            raise APIError(404, f"The model '{model}' does not exist.", param="model",
                           code="model_not_found")
        return self.model(model, models[model])
