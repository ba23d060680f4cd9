"""The API server's copy of the worker table, and the rules for picking a worker from it.

Pure state and policy, no HTTP: `feed.py` applies the controller's `/worker_table` answers,
`transport.py` asks for a worker, counts its requests in flight and reports refusals; tests
drive it directly (with their own random source and clock).

Picking uses the controller's dispatch method (dispatch.py) plus what this server knows that
the table does not yet: its own requests in flight, workers that just refused a connection
(out of rotation until their next heartbeat), workers that say they are not ready (an upstream
server down), and, for the `prefix` method, which worker served a conversation before.

A model whose last worker left the table (a restart, a crash) is not unknown: for `grace`
seconds after it was last served (`--model-grace`, default 60), and always for the names the
stack declares (`expected`, from `llmrelay up`), a request for it gets 503 with `Retry-After`
(its workers are restarting or unavailable), which clients retry, never the 404 a client takes
as final. `/v1/models` lists only the models served (or declared on demand) now.
"""

from __future__ import annotations

import difflib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from llmrelay.api.errors import APIError
from llmrelay.dispatch import Affinity, pick
from llmrelay.protocol import EXT_DELTA, EXT_MESSAGES, EXT_TOKEN_IDS, Features, OurStatus

log = logging.getLogger("llmrelay.api")

_OURS = frozenset({EXT_MESSAGES, EXT_DELTA})
DOWNLOAD_RETRY_S = 10  # Retry-After of a request for a model its worker is still downloading
DEFAULT_GRACE = 60.0  # seconds a model that was served answers 503, not 404, once its workers left


@dataclass(slots=True)
class Worker:
    """One worker as the table last described it; its status is read once, when applied."""

    name: str
    model_names: list[str]
    speed: float
    queue_length: int  # the load from elsewhere: the reported queue less our requests in flight
    last_heart_beat: float
    registered_at: float
    status: dict[str, Any] = field(default_factory=dict)  # as sent (the operator view shows it)
    ours: OurStatus | None = None  # the `llmrelay` section; None for a FastChat worker
    extensions: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entry: dict[str, Any], inflight: int = 0) -> Worker:
        """A worker from one entry of `/worker_table`."""
        status = dict(entry.get("status") or {})
        ours = OurStatus.of(status)
        return cls(
            name=entry["name"], model_names=list(entry.get("model_names", [])),
            speed=float(entry.get("speed", 1)),
            queue_length=max(0, int(entry.get("queue_length", 0)) - inflight),
            last_heart_beat=float(entry.get("last_heart_beat", 0)),
            registered_at=float(entry.get("registered_at", 0)),
            status=status, ours=ours,
            extensions=frozenset(ours.extensions) if ours is not None else frozenset(),
        )

    @property
    def ready(self) -> bool:
        """False while the worker says it cannot serve (engines/openai.py: upstream down)."""
        return self.ours is None or self.ours.ready

    @property
    def speaks_ours(self) -> bool:
        """Takes our chat `messages` and answers with delta frames (else: FastChat's protocol)."""
        return _OURS <= self.extensions

    @property
    def takes_token_ids(self) -> bool:
        return EXT_TOKEN_IDS in self.extensions

    @property
    def features(self) -> Features | None:
        """What the engine declared it honours; None for a FastChat worker (unknown)."""
        return self.ours.features if self.ours is not None else None

    @property
    def serves_embeddings(self) -> bool:
        """A FastChat worker is taken at its word: it may serve embeddings."""
        return self.ours is None or self.ours.features.embeddings

    @property
    def embedding_dimensions(self) -> list[int]:
        return list(self.ours.features.embedding_dimensions) if self.ours is not None else []

    def entry(self) -> dict[str, Any]:
        """Back to a `/worker_table` entry (the operator view of the last copy)."""
        return {"name": self.name, "model_names": self.model_names, "speed": self.speed,
                "queue_length": self.queue_length, "last_heart_beat": self.last_heart_beat,
                "status": self.status}


Accept = Callable[[Worker], bool]


class WorkerTable:
    """What this API server knows about workers, and who it sends a request to.

    `controllers` and `controller_ok` say where the table comes from (feed.py or
    registryfeed.py keeps them);
    they are only used in messages and metrics.
    """

    def __init__(self, controllers: Iterable[str] = (), rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, grace: float = DEFAULT_GRACE,
                 expected: Iterable[str] = ()) -> None:
        self.controllers = [c.rstrip("/") for c in controllers]
        self.source = "controller"  # or "registry" (the NATS registry, api/registryfeed.py)
        self.rng = rng
        self.clock = clock
        self.workers: dict[str, Worker] = {}
        self.dispatch_method = "shortest_queue"
        self.loaded = False  # whether any table was ever applied
        self.controller_ok = False
        self.inflight: dict[str, int] = {}  # worker -> this server's requests open on it
        self.down: dict[str, float] = {}  # worker -> its last heartbeat when it refused us
        self.affinity = Affinity()  # conversation prefix -> worker, for the `prefix` method
        # Models declared for loading on demand (api/ondemand): they exist though not served.
        self.declared_names: Callable[[], Iterable[str]] = tuple
        self.grace = max(0.0, grace)
        self.expected = frozenset(expected)  # names the stack declares: 503 while not served
        self.gone: dict[str, float] = {}  # model -> when its last worker left the table

    # ---- the controller's answers ------------------------------------------------------------

    def apply(self, table: dict[str, Any]) -> None:
        """Take a `/worker_table` answer as the new state (KeyError/ValueError if malformed)."""
        workers = {}
        for entry in table.get("workers", []):
            # The reported queue includes our own requests in flight, which `pick` adds
            # exactly; keep only the load from elsewhere.
            w = Worker.of(entry, self.inflight.get(entry["name"], 0))
            workers[w.name] = w
        if table.get("warming_up"):
            # A controller that just (re)started has not heard every worker yet: keep the ones
            # we knew until it has been up for a whole expiration period.
            for name, w in self.workers.items():
                workers.setdefault(name, w)
        for name, beat in list(self.down.items()):
            w = workers.get(name)
            if w is None or w.last_heart_beat > beat:
                del self.down[name]  # gone from the table, or alive again by its heartbeat
        self._note_gone(self.models(), workers)
        self.workers = workers
        self.dispatch_method = table.get("dispatch_method", self.dispatch_method)
        self.loaded = True

    def _note_gone(self, before: Iterable[str], workers: dict[str, Worker]) -> None:
        """Remember when a model's last worker left; forget it once served again or after the
        grace period."""
        now = self.clock()
        served = {m for w in workers.values() for m in w.model_names}
        for m in before:
            if m not in served:
                self.gone[m] = now
        for m, since in list(self.gone.items()):
            if m in served or now - since > self.grace:
                del self.gone[m]

    def unavailable(self, model: str) -> bool:
        """Not served now, but expected back: declared by the stack, or served less than
        `grace` seconds ago."""
        since = self.gone.get(model)
        return model in self.expected or (since is not None
                                          and self.clock() - since <= self.grace)

    def snapshot(self) -> dict[str, Any]:
        """The last copy in `/worker_table`'s shape (for the operator view)."""
        return {"now": self.clock(), "dispatch_method": self.dispatch_method,
                "workers": [w.entry() for w in self.workers.values()]}

    # ---- questions ---------------------------------------------------------------------------

    def models(self) -> dict[str, float]:
        """Served model names -> when first registered."""
        out: dict[str, float] = {}
        for w in self.workers.values():
            for m in w.model_names:
                out[m] = min(out.get(m, w.registered_at), w.registered_at)
        return out

    def serving(self, model: str) -> list[Worker]:
        """Every worker of the model in the table, usable now or not."""
        return [w for w in self.workers.values() if model in w.model_names]

    def downloading(self) -> dict[str, dict[str, Any]]:
        """Model names -> download progress, of workers still fetching their model from the
        hub (registered with no model names: worker/download.py)."""
        out: dict[str, dict[str, Any]] = {}
        for w in self.workers.values():
            d = w.ours.model_extra.get("downloading") if w.ours is not None and \
                w.ours.model_extra else None
            if isinstance(d, dict) and isinstance(d.get("models"), list):
                for m in d["models"]:
                    if isinstance(m, str):
                        out[m] = {k: v for k, v in d.items() if k != "models"}
        return out

    def check_model(self, model: str, allowed: Callable[[str], bool] | None = None) -> None:
        """404 for a model nobody serves (with the closest name); 503 if we know no workers,
        or the model's workers left and are expected back (`unavailable`).

        `allowed`: the models the caller may use (an API key's list); any other is answered
        exactly as if nobody served it, and only allowed names are listed."""
        if allowed is None or allowed(model):
            if any(model in w.model_names for w in self.workers.values()):
                return
            fetching = self.downloading().get(model)
            if fetching is not None:
                raise APIError(503, f"The model '{model[:100]}' is being downloaded by its worker "
                               f"({float(fetching.get('percent') or 0):.0f}% done); it is served "
                               "once the download ends and the model is loaded. Retry later.",
                               type="server_error", param="model", code="model_downloading",
                               headers={"Retry-After": str(DOWNLOAD_RETRY_S)})
            if self.unavailable(model):
                raise APIError(503, f"The model '{model[:100]}' is not available right now: its "
                               "workers are restarting or unavailable. Retry shortly.",
                               type="server_error", param="model", code="model_unavailable",
                               headers={"Retry-After": "2"})
        every = set(self.models()) | set(self.declared_names()) | set(self.downloading())
        names = sorted(m for m in every if allowed is None or allowed(m))
        if not every and not self.workers:
            why = "" if self.controller_ok else (
                f" The {self.source} at {', '.join(self.controllers)} is not reachable.")
            raise APIError(503, f"No model workers are available right now.{why}",
                           type="server_error", headers={"Retry-After": "2"})
        close = difflib.get_close_matches(model.lower(), [n.lower() for n in names], n=1,
                                          cutoff=0.4)
        hint = ""
        if close:
            hint = f" Did you mean '{next(n for n in names if n.lower() == close[0])}'?"
        serves = f" This server serves: {', '.join(names)}." if names else ""
        raise APIError(
            404,
            f"The model '{model[:100]}' does not exist.{serves}{hint}",
            param="model", code="model_not_found",
        )

    def pick(self, model: str, exclude: set[str] | frozenset[str] = frozenset(),
             keys: list[str] | None = None, accept: Accept | None = None) -> Worker | None:
        """A worker of `model` not in `exclude`, not down, ready (and `accept`ed), by the
        dispatch method with this server's requests in flight added to the reported queues.
        `keys`: the conversation's prefix keys (`dispatch.conversation_keys`), for `prefix`."""
        candidates = [w for w in self.workers.values()
                      if model in w.model_names and w.name not in exclude
                      and w.name not in self.down and w.ready
                      and (accept is None or accept(w))]
        preferred = self.affinity.lookup(keys) if keys else None
        chosen = pick(self.dispatch_method, candidates, self.rng, extra_load=self.inflight,
                      preferred=preferred)
        return chosen if isinstance(chosen, Worker) else None

    # ---- what happened -----------------------------------------------------------------------

    def mark_down(self, worker: Worker) -> None:
        """The worker refused a connection: out of rotation until its next heartbeat."""
        self.down[worker.name] = worker.last_heart_beat
        log.warning("worker %s refused the connection; out of rotation until its next heartbeat",
                    worker.name)

    def acquire(self, name: str) -> None:
        """One more request of ours open on the worker."""
        self.inflight[name] = self.inflight.get(name, 0) + 1

    def release(self, name: str) -> None:
        n = self.inflight.get(name, 1) - 1
        if n <= 0:
            self.inflight.pop(name, None)
        else:
            self.inflight[name] = n

    def remember(self, keys: list[str] | None, name: str) -> None:
        """The worker served this conversation (for `prefix`)."""
        if keys:
            self.affinity.remember(keys, name)
