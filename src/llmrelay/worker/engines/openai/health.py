"""The upstream's health, which decides the worker's: its model list is read every
`--upstream-check-interval` seconds on the worker's event loop. While it fails the worker says
`ready: false` in its status (our API server routes nothing here, the controller keeps it
listed) and refuses generations at once with a 5xx code, so a FastChat API server fails over.

A look that times out is not at once a failure: the server took the request and is busy
(llama-cpp-python's server answers its model list only between generations). While this worker
has requests running there it never counts; otherwise only TIMEOUTS_TO_DOWN in a row count (a
server that hangs). Refused connections and error statuses count at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import openai

from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.engines.openai.errors import describe, status_error

log = logging.getLogger("llmrelay.worker")

CHECK_TIMEOUT = 5.0  # seconds one look at the model list may take
TIMEOUTS_TO_DOWN = 3


def model_entries(data: Any) -> list[dict[str, Any]]:
    """The models of a `/models` answer's `data` (each with an `id`); ValueError if malformed."""
    if not isinstance(data, list):
        raise ValueError("no `data` list in /models")
    return [m for m in data if isinstance(m, dict) and m.get("id")]


class Health:
    """What the last look at the upstream's model list found."""

    def __init__(self, base_url: str, models: list[dict[str, Any]] | None = None) -> None:
        self.base_url = base_url
        self.models: list[dict[str, Any]] = list(models or [])
        self.healthy = False
        self.last_error = "not checked yet"
        self.checked_at = 0.0
        self.timeouts = 0  # looks in a row that timed out

    @property
    def ids(self) -> list[str]:
        return [str(m["id"]) for m in self.models]

    def note(self, ok: bool, error: str = "") -> None:
        """Record a check's outcome, logging when the state changes."""
        self.checked_at = time.time()
        if ok != self.healthy:
            if ok:
                log.info("upstream %s is up (%s)", self.base_url, ", ".join(self.ids) or "no models")
            else:
                log.warning("upstream %s is down (%s): this worker reports ready=false and "
                            "refuses requests until it answers again", self.base_url, error)
        self.healthy, self.last_error = ok, error

    async def check(self, client: openai.AsyncOpenAI, busy: bool = False) -> bool:
        """One look at the model list (`client.models.list()`); `busy`: this worker has
        requests running at the upstream."""
        try:
            page = await client.models.list(timeout=CHECK_TIMEOUT)
            self.models = model_entries([m.to_dict() for m in page.data])
        except openai.APITimeoutError as e:
            self.timeouts += 1
            if busy or self.timeouts < TIMEOUTS_TO_DOWN:
                log.debug("upstream %s is slow to list its models (busy): %s", self.base_url, e)
                return self.healthy
            self.note(False, describe(e))
            return False
        except (openai.APIError, ValueError) as e:
            if isinstance(e, openai.APIStatusError):
                e = status_error(e, "model list")  # type: ignore[assignment]
            self.note(False, describe(e))
            return False
        self.timeouts = 0
        self.note(True)
        return True

    def refuse_if_down(self) -> None:
        if not self.healthy:
            raise EngineError(f"the upstream server {self.base_url} is not available "
                              f"({self.last_error})")

    def status(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "healthy": self.healthy, "models": self.ids,
                "last_error": self.last_error or None, "checked_at": self.checked_at}
