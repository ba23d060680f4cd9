"""A worker's download phase: a hub model (`--model-path ORG/NAME[:QUANT]`, hub.py) is fetched
before the engine loads it, and the cluster is told how far that is.

- Percentage lines go to the log (and so to `llmrelay up`'s output); on a terminal,
  huggingface_hub's own bars are shown too.
- While it downloads, and then loads the model, the worker is registered with its controllers
  with no model names (nothing is routed to it) and `llmrelay.downloading` (the names it will
  serve, bytes done and in all, percent), refreshed every second: the API server lists those
  names with state `downloading` and answers a request for one with a 503 and Retry-After;
  `llmrelay models list` and `up` see it. Once the model is loaded the worker's own
  registration takes the same entry over (`handover`: no moment where the name is unknown); a
  worker that fails withdraws it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from typing import Any

import httpx

from llmrelay import __version__
from llmrelay.security import auth_headers
from llmrelay.worker import hub
from llmrelay.worker.lifecycle import ControllerLink

log = logging.getLogger("llmrelay.worker")


def downloading_status(names: list[str], progress: hub.Progress | None) -> dict[str, Any]:
    """A worker's status while its model downloads: routable for nothing, progress for all."""
    p = progress.to_json() if progress is not None else {"done_bytes": 0, "total_bytes": 0,
                                                          "percent": 0.0}
    return {"model_names": [], "speed": 0, "queue_length": 0,
            "llmrelay": {"version": __version__, "extensions": [], "engine": "", "ready": False,
                         "state": "downloading", "downloading": {"models": names, **p}}}


class Announcer:
    """Keeps a `downloading` registration with each controller, from a thread of its own (the
    worker's event loop does not run yet)."""

    def __init__(self, controllers: list[str], address: str, token: str | None,
                 names: list[str], interval: float = 1.0) -> None:
        self.controllers = controllers
        self.address = address
        self.token = token
        self.names = names
        self.interval = interval
        self.progress: hub.Progress | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._stopped = False
        self._deregister = True
        self._thread = threading.Thread(target=self._run, daemon=True, name="download-announcer")

    def status(self) -> dict[str, Any]:
        status = downloading_status(self.names, self.progress)
        if self.progress is not None and self.progress.finished:
            status["llmrelay"]["state"] = "loading"  # fetched; the engine loads it
        return status

    def update(self, p: hub.Progress) -> None:
        """The download's progress; the first one starts the registration (a model already
        in the cache is never announced)."""
        self.progress = p
        if self.controllers and not self._thread.is_alive() and not self._stopped:
            self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0),
                                     headers=auth_headers(self.token)) as client:
            links = [ControllerLink(client, c, self.address, self.status, self.interval)
                     for c in self.controllers]
            tasks = [asyncio.create_task(link.run()) for link in links]
            await self._done.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._deregister:
                await asyncio.gather(*(link.deregister() for link in links if link.registered))

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(deregister=True)

    def handover(self) -> None:
        """Stop, leaving the registration to the worker's own (same address)."""
        self.stop(deregister=False)

    def stop(self, deregister: bool) -> None:
        self._stopped = True
        self._deregister = deregister
        if not self._thread.is_alive():
            return
        for _ in range(50):  # the thread's loop may still be starting
            if self._loop is not None and self._done is not None:
                break
            threading.Event().wait(0.05)
        if self._loop is not None and self._done is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)


def progress_bars(show: bool | None = None) -> None:
    """huggingface_hub's bars on a terminal only (a log gets our percentage lines instead)."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if show is None:
        show = sys.stderr.isatty()
    (enable_progress_bars if show else disable_progress_bars)()
