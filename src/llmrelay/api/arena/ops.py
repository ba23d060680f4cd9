"""The operations view's live numbers: every few seconds the API server samples its worker table
and its own metrics into a ring buffer (the last ten minutes by default), which the page draws
as charts. Per worker: queue length, requests running, requests this server has in flight.
Per model: generated tokens per second and requests per second (differences of the metrics'
counters between samples), queue and running summed over its workers, and the time to first
token's p50 and p95 over the last minute (the difference of the TTFT histogram's buckets, read
as Prometheus's histogram_quantile reads them).

`Sampler.sample` is plain Python over the table and the metrics; `run` calls it on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llmrelay.api.table import WorkerTable
from llmrelay.metrics import ApiMetrics
from llmrelay.ondemand.view import is_host

log = logging.getLogger("llmrelay.api")

TTFT_WINDOW = 60.0  # seconds of requests each TTFT quantile covers


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs sorted by
    bound (the last one +Inf), interpolated linearly within the bucket that holds it; None
    with no observations. Above the last finite bound: that bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _by_model(metric: Any, suffix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                out[s.labels["model"]] = out.get(s.labels["model"], 0.0) + s.value
    return out


def _buckets(metric: Any) -> dict[str, dict[float, float]]:
    out: dict[str, dict[float, float]] = {}
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                out.setdefault(s.labels["model"], {})[float(s.labels["le"])] = s.value
    return out


class Sampler:
    """The ring buffer of samples (see the module docstring)."""

    def __init__(self, table: WorkerTable, metrics: ApiMetrics, interval: float = 2.0,
                 window: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=max(2, int(window / interval) + 1))
        self._raw: deque[tuple[float, dict[str, float], dict[str, float],
                               dict[str, dict[float, float]]]] = deque()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, Any]:
        """Read the table and the metrics now; append the sample and return it."""
        now = self.clock()
        tokens = _by_model(self.metrics.completion_tokens, "_total")
        requests = _by_model(self.metrics.ttft, "_count")
        hist = _buckets(self.metrics.ttft)
        prev = self._raw[-1] if self._raw else None
        self._raw.append((now, tokens, requests, hist))
        while len(self._raw) > 2 and self._raw[1][0] <= now - TTFT_WINDOW:
            self._raw.popleft()
        old_hist = self._raw[0][3] if self._raw[0][0] <= now - TTFT_WINDOW / 2 else {}
        workers = []
        models: dict[str, dict[str, Any]] = {}
        for w in self.table.workers.values():
            if is_host(w.status):
                continue  # a host of models on demand serves nothing itself
            running = w.ours.running if w.ours is not None else 0
            here = self.table.inflight.get(w.name, 0)
            workers.append({"address": w.name, "models": list(w.model_names),
                            "queue": w.queue_length + here, "running": running,
                            "in_flight_here": here})
            for m in w.model_names:
                row = models.setdefault(m, {"queue": 0, "running": 0})
                row["queue"] += w.queue_length + here
                row["running"] += running
        names = set(models) | set(tokens)
        dt = now - prev[0] if prev is not None else 0.0
        for m in names:
            row = models.setdefault(m, {"queue": 0, "running": 0})
            row["tokens_per_s"] = (round(max(0.0, tokens.get(m, 0.0) - prev[1].get(m, 0.0)) / dt, 2)
                                   if prev is not None and dt > 0 else 0.0)
            row["requests_per_s"] = (round(max(0.0, requests.get(m, 0.0) - prev[2].get(m, 0.0))
                                           / dt, 3) if prev is not None and dt > 0 else 0.0)
            now_b, then_b = hist.get(m, {}), old_hist.get(m, {})
            diff = sorted((le, now_b[le] - then_b.get(le, 0.0)) for le in now_b)
            p50, p95 = quantile(0.5, diff), quantile(0.95, diff)
            row["ttft_p50"] = round(p50, 4) if p50 is not None else None
            row["ttft_p95"] = round(p95, 4) if p95 is not None else None
        out = {"t": round(now, 3), "workers": workers, "models": models}
        self.samples.append(out)
        return out

    def since(self, t: float = 0.0) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["t"] > t]

    async def _loop(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a sample must never stop the sampling
                log.exception("could not sample the operations view's numbers")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
