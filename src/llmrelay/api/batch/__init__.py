"""OpenAI's Files and Batch APIs (docs/batch-api.md): `lines.py` (an input file's checks),
`state.py` (the records, their statuses and limits), `storage.py` (where they live: `store.py`,
SQLite beside the stored Responses and the files' bytes on disk; or `natsstore.py`, the NATS
registry's JetStream, shared by every API server on it), `execute.py` (one line through its
front door's serving object), `runner.py` (batches at the workers' lowest priority, resumed after a restart),
`serving.py` and `routes.py` (the endpoints). `mount` wires them into the API server."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.params import Depends

from llmrelay.api.batch import routes
from llmrelay.api.batch.execute import Doors
from llmrelay.api.batch.runner import SWEEP, BatchRunner
from llmrelay.api.batch.serving import BatchServing, FileServing
from llmrelay.api.batch.state import BatchLimits
from llmrelay.api.batch.storage import Store
from llmrelay.api.table import WorkerTable
from llmrelay.api.usage import UsageStore


def mount(app: FastAPI, guarded: list[Depends], table: WorkerTable, doors: Doors,
          store: Store, limits: BatchLimits, usage: UsageStore | None = None,
          clock: Callable[[], float] = time.time, me: str = "") -> BatchRunner:
    """Add the routes; the runner returned is started and closed by the app's lifespan (it
    opens and closes the store); `me`: this API server's address (a shared store's leases)."""
    runner = BatchRunner(store, table, doors, usage, clock, me,
                         sweep=min(SWEEP, limits.min_expiry_seconds / 2))
    routes.mount(app, guarded, FileServing(store, runner, limits, clock),
                 BatchServing(store, runner, table, limits, clock))
    return runner
