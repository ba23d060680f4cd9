"""What a host needs from a worker it manages (llmrelay.ondemand): is it in use, since when, and
a way to stop taking requests only if none is open, decided in one step.

`Activity` counts the generation and embedding requests open on this worker, from the moment
they arrive until their answer (streamed or not) has been sent, and when the last one ended.
`GET /worker_activity` reports it; `POST /worker_drain_if_idle` starts draining (new requests
are refused as "shutting down", which the API server treats as a reason to load the model
again) only when nothing is open or queued, and says whether it did. Both run on the worker's
event loop between two awaits, so no request can slip in between the check and the drain: an
unload never cuts a request off.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

TRACKED = ("/worker_generate_stream", "/worker_generate", "/worker_get_embeddings")


class Activity:
    def __init__(self) -> None:
        self.inflight = 0
        self.requests = 0  # started since the worker started
        self.last_used = time.time()  # a worker just started counts as just used

    def report(self, queued: int) -> dict[str, Any]:
        busy = max(self.inflight, queued)
        return {"busy": busy, "requests": self.requests,
                "last_used": time.time() if busy else self.last_used}


class ActivityMiddleware:
    def __init__(self, app: ASGIApp, activity: Activity) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in TRACKED:
            await self.app(scope, receive, send)
            return
        a = self.activity
        a.inflight += 1
        a.requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            a.inflight -= 1
            a.last_used = time.time()


def install(app: FastAPI, state: Any) -> Activity:
    """Add the counting and the two endpoints to a worker's app; `state` is its WorkerState
    (`queue_length`, `draining`)."""
    activity = Activity()
    app.add_middleware(ActivityMiddleware, activity=activity)

    @app.get("/worker_activity")
    async def worker_activity() -> Any:
        return activity.report(state.queue_length)

    @app.post("/worker_drain_if_idle")
    async def worker_drain_if_idle() -> Any:
        idle = activity.inflight == 0 and state.queue_length == 0
        if idle:
            state.draining = True
        return {"drained": idle or state.draining and activity.inflight == 0,
                **activity.report(state.queue_length)}

    return activity
