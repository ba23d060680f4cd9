"""The served model names, from the API server's worker table, and the models declared for
loading on demand (with their state on their host)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from llmrelay.api.errors import APIError
from llmrelay.api.models.protocol import Model, ModelList
from llmrelay.api.table import WorkerTable
from llmrelay.ondemand.view import Declared


class ModelServing:
    def __init__(self, table: WorkerTable,
                 declared: Callable[[], Mapping[str, Declared]] | None = None) -> None:
        self.table = table
        self.declared = declared or dict

    def _all(self) -> dict[str, Model]:
        models = self.table.models()
        out = {m: Model(id=m, created=int(t)) for m, t in models.items()}
        for name, d in self.declared().items():
            # Served by a worker that is not its host's (one always loaded): loaded.
            elsewhere = any(w.name != d.address for w in self.table.serving(name))
            out[name] = Model(id=name, created=int(models.get(name, d.since)),
                              state="loaded" if elsewhere else d.state)
        return out

    def list(self) -> ModelList:
        models = self._all()
        return ModelList(data=[models[m] for m in sorted(models)])

    def get(self, model: str) -> Model:
        models = self._all()
        if model not in models:
            self.table.check_model(model)  # raises the 404 (or 503) with the served names
            raise APIError(404, f"The model '{model}' does not exist.", param="model",
                           code="model_not_found")
        return models[model]
