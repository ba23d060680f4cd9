"""Prometheus metrics of the three processes (`GET /metrics` on each), with prometheus-client.

Each app owns its own `CollectorRegistry` (several apps may live in one test process). Counters
and histograms are updated where things happen; gauges of live state (queue lengths, workers
alive) are read from that state when scraped, so they are never stale. Label values are bounded:
model labels only ever hold names a worker serves, never what a client typed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import Response

# Seconds: small CPU models answer their first token in tens of ms, long answers take minutes.
TIME_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class LiveGauges(Collector):
    """Gauges computed at scrape time: `read()` yields (name, help, labels, [(values, value)])."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, list[str],
                                                        list[tuple[list[str], float]]]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, doc, labels, samples in self.read():
            g = GaugeMetricFamily(name, doc, labels=labels)
            for values, value in samples:
                g.add_metric(values, value)
            yield g


class ApiMetrics:
    """The API server: requests, tokens, time to first token, latency, failovers, workers."""

    def __init__(self, table: Any) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmrelay_api_requests", "Requests answered, by endpoint, model "
                                "and HTTP status (499: the client left before the end)",
                                ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("llmrelay_api_prompt_tokens", "Prompt tokens processed "
                                     "(each choice of n counts its prompt)", ["model"], registry=r)
        self.completion_tokens = Counter("llmrelay_api_completion_tokens",
                                         "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("llmrelay_api_time_to_first_token_seconds", "From the request's "
                              "arrival to its first generated text reaching this server (for a "
                              "non-streamed request: its whole answer)", ["model"],
                              buckets=TIME_BUCKETS, registry=r)
        self.latency = Histogram("llmrelay_api_request_duration_seconds", "From the request's "
                                 "arrival to the end of its answer", ["endpoint", "model"],
                                 buckets=TIME_BUCKETS, registry=r)
        self.failovers = Counter("llmrelay_api_failovers", "Workers that failed or were full "
                                 "before the first token, or before the whole answer of a "
                                 "non-streamed request (the request moves on to another "
                                 "worker if one is left)", ["model"], registry=r)
        self.migrations = Counter("llmrelay_api_migrations", "Started generations moved to "
                                  "another worker mid-answer (continuation), by reason",
                                  ["model", "reason"], registry=r)
        # Per API key (the key's name, never the secret; `anonymous` on a server without
        # keys): what the usage store counts, and the requests the key's limits refused.
        self.key_requests = Counter("llmrelay_api_key_requests", "Requests answered per API "
                                    "key and model", ["key", "model"], registry=r)
        self.key_prompt_tokens = Counter("llmrelay_api_key_prompt_tokens", "Prompt tokens "
                                         "charged per API key and model (as the answers' usage "
                                         "says)", ["key", "model"], registry=r)
        self.key_completion_tokens = Counter("llmrelay_api_key_completion_tokens",
                                             "Completion tokens charged per API key and model",
                                             ["key", "model"], registry=r)
        self.key_rate_limited = Counter("llmrelay_api_key_rate_limited", "Requests refused "
                                        "with 429 by a key's limits, by limit (requests, "
                                        "tokens, concurrent)", ["key", "limit"], registry=r)

        def live() -> Iterable[tuple[str, str, list[str], list[tuple[list[str], float]]]]:
            workers = list(table.workers.values())
            models = sorted({m for w in workers for m in w.model_names})
            yield ("llmrelay_api_workers_alive", "Workers in this server's table, per model",
                   ["model"], [([m], sum(m in w.model_names and w.name not in table.down
                                         for w in workers)) for m in models])
            yield ("llmrelay_api_queue_length", "Queue length per model: the workers' reported "
                   "queues plus this server's requests in flight", ["model"],
                   [([m], sum(w.queue_length + table.inflight.get(w.name, 0)
                              for w in workers if m in w.model_names)) for m in models])
            yield ("llmrelay_api_requests_in_flight", "Generations this server has open",
                   [], [([], sum(table.inflight.values()))])
            yield ("llmrelay_api_controller_reachable", "1 if the last table read succeeded",
                   [], [([], float(bool(table.controller_ok)))])

        r.register(LiveGauges(live))


class WorkerMetrics:
    """A model worker: requests by outcome, tokens, time to first token, latency, its queue."""

    def __init__(self, state: Any) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmrelay_worker_requests", "Generations by model and outcome "
                                "(ok, error, refused, cancelled)", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("llmrelay_worker_prompt_tokens", "Prompt tokens processed",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("llmrelay_worker_completion_tokens", "Tokens generated",
                                         ["model"], registry=r)
        self.draft_proposed = Counter("llmrelay_worker_speculative_proposed_tokens", "Draft "
                                      "tokens proposed by speculative decoding", ["model"],
                                      registry=r)
        self.draft_accepted = Counter("llmrelay_worker_speculative_accepted_tokens", "Draft "
                                      "tokens the model accepted (each a token without a step "
                                      "of its own)", ["model"], registry=r)
        self.ttft = Histogram("llmrelay_worker_time_to_first_token_seconds", "From admission "
                              "request to the first chunk of the engine (queue wait included)",
                              ["model"], buckets=TIME_BUCKETS, registry=r)
        self.latency = Histogram("llmrelay_worker_request_duration_seconds", "Whole generation, "
                                 "queue wait included", ["model"], buckets=TIME_BUCKETS, registry=r)

        def live() -> Iterable[tuple[str, str, list[str], list[tuple[list[str], float]]]]:
            yield ("llmrelay_worker_queue_length", "Requests running plus waiting", [],
                   [([], state.queue_length)])
            yield ("llmrelay_worker_running", "Requests running", [], [([], state.running)])
            yield ("llmrelay_worker_waiting", "Requests waiting for a slot", [],
                   [([], state.waiting)])

        r.register(LiveGauges(live))


class ControllerMetrics:
    """The controller: registrations, expiries, heartbeats, workers alive and their queues."""

    def __init__(self, registry: Any) -> None:
        r = self.registry = CollectorRegistry()
        self.registrations = Counter("llmrelay_controller_registrations", "Worker registrations "
                                     "(kind: new or again)", ["kind"], registry=r)
        self.expirations = Counter("llmrelay_controller_expirations", "Workers dropped after "
                                   "missing their heartbeats", registry=r)
        self.deregistrations = Counter("llmrelay_controller_deregistrations",
                                       "Workers that deregistered", registry=r)
        self.heartbeats = Counter("llmrelay_controller_heartbeats", "Heartbeats received "
                                  "(known: whether the worker was in the table)", ["known"],
                                  registry=r)

        def live() -> Iterable[tuple[str, str, list[str], list[tuple[list[str], float]]]]:
            workers = list(registry.workers.values())
            models = sorted({m for w in workers for m in w.model_names})
            yield ("llmrelay_controller_workers_alive", "Workers in the table", [],
                   [([], len(workers))])
            yield ("llmrelay_controller_model_workers", "Workers per model", ["model"],
                   [([m], sum(m in w.model_names for w in workers)) for m in models])
            yield ("llmrelay_controller_queue_length", "Queue length per model, from heartbeats",
                   ["model"], [([m], sum(w.queue_length for w in workers if m in w.model_names))
                               for m in models])

        r.register(LiveGauges(live))
