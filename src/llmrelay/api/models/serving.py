"""The served model names, from the API server's worker table; an API key with a model list
sees only the models it may use (`allowed`)."""

from __future__ import annotations

from collections.abc import Callable

from llmrelay.api.errors import APIError
from llmrelay.api.models.protocol import Model, ModelList
from llmrelay.api.table import WorkerTable


class ModelServing:
    def __init__(self, table: WorkerTable) -> None:
        self.table = table

    def list(self, allowed: Callable[[str], bool] | None = None) -> ModelList:
        models = self.table.models()
        return ModelList(data=[Model(id=m, created=int(models[m])) for m in sorted(models)
                               if allowed is None or allowed(m)])

    def get(self, model: str, allowed: Callable[[str], bool] | None = None) -> Model:
        models = self.table.models()
        if model not in models or (allowed is not None and not allowed(model)):
            self.table.check_model(model, allowed)  # raises the 404 (or 503) with the names
            raise APIError(404, f"The model '{model}' does not exist.", param="model",
                           code="model_not_found")
        return Model(id=model, created=int(models[model]))
