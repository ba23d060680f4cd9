"""Hub models a host declares before their files are here (`model_path = "ORG/NAME[:QUANT]"`
not yet in the cache): fetched when first wanted, once however many requests wait, then
estimated and loaded like any other model.

While a model downloads, the host shows it as `downloading` with its progress (in its
registration, so `/v1/models` shows it, and in `llmrelay models list`), logs percentage lines,
and the requests for it wait (the API server's middleware sends SSE keep-alives). A fetch that
fails is refused with its cause, the same for every request during a back-off of
`RETRY_S` seconds (a name that is not on the hub is not asked for again at each request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmrelay.ondemand.catalog import ModelSpec
from llmrelay.ondemand.policy import Refusal
from llmrelay.worker import hub
from llmrelay.worker.models import ModelNotFound, resolve

log = logging.getLogger("llmrelay.host")

RETRY_S = 30.0
DOWNLOADING = "downloading"


@dataclass
class Failure:
    message: str
    at: float


class Fetches:
    def __init__(self, changed: Callable[[], None], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.changed = changed  # the host sends its new state (called on its event loop)
        self.clock = clock
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.progress: dict[str, hub.Progress] = {}
        self.failures: dict[str, Failure] = {}
        self.active: set[str] = set()

    @staticmethod
    def needed(spec: ModelSpec) -> bool:
        return spec.kind == "hub"

    def state(self, name: str) -> dict[str, Any] | None:
        """`state` and `download` (progress) of a model being fetched; None otherwise."""
        if name not in self.active:
            return None
        p = self.progress.get(name)
        return {"state": DOWNLOADING, "download": p.to_json() if p is not None else None}

    async def ensure(self, spec: ModelSpec) -> None:
        """Return once `spec`'s files are in the cache (spec.path and kind then set); Refusal
        with the cause otherwise."""
        if not self.needed(spec):
            return
        failed = self.failures.get(spec.name)
        if failed is not None and self.clock() - failed.at < RETRY_S:
            wait = RETRY_S - (self.clock() - failed.at)
            raise Refusal(503, f"Model '{spec.name}' cannot be fetched: {failed.message} (tried "
                          f"again in {wait:.0f} s)", "model_download_failed", retry_after=wait)
        task = self.tasks.get(spec.name)
        if task is None or task.done():
            self.active.add(spec.name)
            task = self.tasks[spec.name] = asyncio.create_task(self._fetch(spec))
            self.changed()
        await asyncio.shield(task)
        if self.needed(spec):  # the fetch failed: its cause is the refusal
            raise self.ensure_failed(spec)

    def ensure_failed(self, spec: ModelSpec) -> Refusal:
        failed = self.failures.get(spec.name)
        message = failed.message if failed is not None else "unknown cause"
        return Refusal(503, f"Model '{spec.name}' cannot be fetched: {message}",
                       "model_download_failed", retry_after=RETRY_S)

    async def _fetch(self, spec: ModelSpec) -> None:
        loop = asyncio.get_running_loop()
        lines = hub.LogProgress(spec.name)
        last = [0.0]

        def report(p: hub.Progress) -> None:  # in the download's thread
            self.progress[spec.name] = p
            lines(p)
            if p.percent - last[0] >= 1 or p.finished:
                last[0] = p.percent
                loop.call_soon_threadsafe(self.changed)

        log.info("fetching %s (%s) from %s into %s", spec.name, spec.model_path, hub.where(),
                 hub.cache_dir())
        try:
            model = await asyncio.to_thread(resolve, spec.model_path, spec.flags.get("revision"),
                                            report)
        except ModelNotFound as e:
            self.failures[spec.name] = Failure(str(e), self.clock())
            log.error("fetching %s failed: %s", spec.name, e)
        else:
            spec.path, spec.kind = str(model.path), model.kind
            self.failures.pop(spec.name, None)
            log.info("%s fetched: %s", spec.name, model.path)
        finally:
            self.progress.pop(spec.name, None)
            self.active.discard(spec.name)
            self.changed()
