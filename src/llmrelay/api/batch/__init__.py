"""OpenAI's Files and Batch APIs (docs/batch-api.md): `lines.py` (an input file's checks),
`state.py` (the records, their statuses and limits), `store.py` (SQLite beside the stored
Responses, files' bytes on disk), `execute.py` (one line through its front door's serving
object), `runner.py` (batches at the workers' lowest priority, resumed after a restart),
`serving.py` and `routes.py` (the endpoints). `mount` wires them into the API server."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.params import Depends

from llmrelay.api.batch import routes
from llmrelay.api.batch.execute import Doors
from llmrelay.api.batch.runner import BatchRunner
from llmrelay.api.batch.serving import BatchServing, FileServing
from llmrelay.api.batch.state import BatchLimits
from llmrelay.api.batch.store import BatchStore
from llmrelay.api.table import WorkerTable
from llmrelay.api.usage import UsageStore


def mount(app: FastAPI, guarded: list[Depends], table: WorkerTable, doors: Doors,
          store: BatchStore, limits: BatchLimits, usage: UsageStore | None = None,
          clock: Callable[[], float] = time.time) -> BatchRunner:
    """Add the routes; the runner returned is started and closed by the app's lifespan."""
    runner = BatchRunner(store, table, doors, usage, clock)
    routes.mount(app, guarded, FileServing(store, runner, limits, clock),
                 BatchServing(store, runner, table, limits, clock))
    return runner
