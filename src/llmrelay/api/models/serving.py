"""The served model names, from the API server's worker table."""

from __future__ import annotations

from llmrelay.api.errors import APIError
from llmrelay.api.models.protocol import Model, ModelList
from llmrelay.api.table import WorkerTable


class ModelServing:
    def __init__(self, table: WorkerTable) -> None:
        self.table = table

    def list(self) -> ModelList:
        models = self.table.models()
        return ModelList(data=[Model(id=m, created=int(models[m])) for m in sorted(models)])

    def get(self, model: str) -> Model:
        models = self.table.models()
        if model not in models:
            self.table.check_model(model)  # raises the 404 (or 503) with the served names
            raise APIError(404, f"The model '{model}' does not exist.", param="model",
                           code="model_not_found")
        return Model(id=model, created=int(models[model]))
