"""The NATS registry with real processes on a real 3-node NATS cluster (JetStream, R3 bucket),
shared by the tests of this module; each test uses a bucket of its own.

- A process without the cluster's credentials can neither register nor read.
- A FastChat 0.2.36 worker registered through one of our controllers is served by every API
  server.
- Chaos: 2 controllers, 3 API servers and 3 workers of the bundled model under 8 streaming
  clients; one NATS node (the bucket's leader), one controller, one API server (its clients
  move to another, as behind a load balancer) and one worker are killed with SIGKILL, one after
  the other. Every request not in flight at a kill succeeds; those in flight end in an answer
  or a clean error; no live worker ever leaves a table; the dead one leaves every table within
  its lease and a restarted one joins them all within 2 s of each other.

The partition test (network namespaces) is in test_registry_netns.py; the parts without
servers in test_registry_units.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from nats_cluster import NatsCluster

from conftest import Procs, api_models, free_port, wait_for

NOWHERE = "http://127.0.0.1:9"  # --controller-address, unused with --registry
LEASE = 3.0  # conftest's heartbeat interval (1 s) x 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path_factory.mktemp("nats"), size=3)
    try:
        yield c.start()
    finally:
        c.stop()


def on(cluster: NatsCluster, bucket: str) -> tuple[str, ...]:
    return (*cluster.args, "--registry-bucket", bucket)


def api_workers(api: str) -> frozenset[str]:
    return frozenset(w["address"] for w in httpx.get(api + "/api/workers", timeout=2)
                     .json()["workers"])


def controller_workers(controller: str) -> frozenset[str]:
    return frozenset(w["name"] for w in httpx.get(controller + "/worker_table", timeout=2)
                     .json()["workers"])


# ---- credentials --------------------------------------------------------------------------------


def test_without_credentials_nothing_registers_or_reads(cluster: NatsCluster, procs: Procs
                                                        ) -> None:
    ok = on(cluster, "creds")
    anonymous = ("--registry", cluster.urls, "--registry-bucket", "creds")
    wrong = (*anonymous, "--registry-user", cluster.user, "--registry-password", "wrong")
    _, api = procs.api(NOWHERE, extra=ok)
    procs.worker(NOWHERE, "good", extra=(*ok, "--engine", "synthetic"))
    wait_for(lambda: api_models(api) == {"good"}, 30, "the worker with credentials")
    strangers = [procs.worker(NOWHERE, name, extra=(*args, "--engine", "synthetic"))[0]
                 for name, args in (("anonymous", anonymous), ("wrong", wrong))]
    _, blind = procs.api(NOWHERE, extra=anonymous)
    for p in strangers:
        wait_for(lambda p=p: "refused this process's credentials" in p.log(), 30,
                 f"{p.name} to be refused")
    time.sleep(LEASE)
    assert api_models(api) == {"good"}  # neither stranger registered
    assert httpx.get(blind + "/health").json()["workers"] == 0  # and one cannot read
    r = httpx.post(blind + "/v1/chat/completions", json={
        "model": "good", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "registry" in r.json()["error"]["message"]
    out = subprocess.run([sys.executable, "-m", "llmrelay.cli", "status", *anonymous],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "refused this process's credentials" in out.stdout
    out = subprocess.run([sys.executable, "-m", "llmrelay.cli", "status", *ok],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bucket leader" in out.stdout and "API servers: 1" in out.stdout
    assert "good" in out.stdout and "anonymous" not in out.stdout


# ---- a FastChat worker through one of our controllers ----------------------------------------


def test_fastchat_worker_via_a_controller_is_served_by_every_api_server(
        cluster: NatsCluster, procs: Procs) -> None:
    from fastchat_env import require_fastchat, require_smollm2_hf
    from test_fastchat_interop import start_fastchat

    python = require_fastchat()
    model = require_smollm2_hf()
    b = on(cluster, "fastchat")
    _, c1 = procs.controller(extra=b)
    _, c2 = procs.controller(extra=b)
    apis = [procs.api(NOWHERE, extra=b)[1] for _ in range(3)]
    port = free_port()
    fc_url = f"http://127.0.0.1:{port}"
    start_fastchat(procs, python, "model_worker", [
        "--host", "127.0.0.1", "--port", str(port), "--worker-address", fc_url,
        "--controller-address", c1, "--model-path", str(model), "--model-names", "fc-only",
        "--device", "cpu"])
    wait_for(lambda: all("fc-only" in api_models(a) for a in apis), 240,
             "the FastChat worker in every API server")
    assert fc_url in controller_workers(c2)  # the other controller reads it from the bucket
    for api in apis:
        client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="fc-only", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Hi!"}])
        assert r.choices[0].message.content


# ---- chaos ----------------------------------------------------------------------------------------

BODY = {"model": "smol", "messages": [{"role": "user", "content": "Count from 1 to 20."}],
        "max_tokens": 8, "temperature": 0, "stream": True}


@dataclass
class Result:
    start: float
    end: float
    api: str
    ok: bool
    clean: bool  # an error the client could read: an error event then [DONE], or a JSON error
    what: str
    moved: int = 0


@dataclass
class Load:
    """8 streaming clients spread over the API servers; a request whose API server does not
    answer (a refused connection, a closed one and no health) goes to another one, as a load
    balancer with health checks would send it."""

    apis: list[str]
    clients: int = 8
    dead: set[str] = field(default_factory=set)
    results: list[Result] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.loop, args=(i,), daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        return threads

    def loop(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                alive = [a for a in self.apis if a not in self.dead]
                self.results.append(self.one(client, alive, i + n))
                n += 1

    def one(self, client: httpx.Client, alive: list[str], k: int) -> Result:
        start = time.monotonic()
        moved = 0
        api = alive[k % len(alive)]
        while True:
            answered = False
            try:
                with client.stream("POST", api + "/v1/chat/completions", json=BODY) as r:
                    answered = True
                    if r.status_code != 200:
                        body = r.read()
                        clean = b'"error"' in body
                        return Result(start, time.monotonic(), api, False, clean,
                                      f"HTTP {r.status_code} {body[:200]!r}", moved)
                    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            except httpx.TransportError as e:
                if not answered and not self.healthy(api):
                    self.dead.add(api)
                    moved += 1
                    api = next(a for a in self.apis if a not in self.dead)
                    continue
                return Result(start, time.monotonic(), api, False, False,
                              f"{type(e).__name__}: {e}", moved)
            end = time.monotonic()
            done = bool(events) and events[-1] == "[DONE]"
            errors = [e for e in events[:-1] if '"error"' in e]
            text = "".join((json.loads(e)["choices"] or [{}])[0].get("delta", {})
                           .get("content") or "" for e in events[:-1] if '"choices"' in e)
            if done and not errors and text:
                return Result(start, end, api, True, True, "answer", moved)
            return Result(start, end, api, False, done and bool(errors),
                          f"stream ended: done={done} errors={errors[:1]}", moved)

    @staticmethod
    def healthy(api: str) -> bool:
        try:
            return httpx.get(api + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


class Monitor:
    """Samples every live reader's table (API servers' /api/workers, controllers'
    /worker_table) every 0.2 s: (time, reader, workers)."""

    def __init__(self, apis: list[str], controllers: list[str]) -> None:
        self.readers = {a: api_workers for a in apis} | {c: controller_workers
                                                         for c in controllers}
        self.dead: set[str] = set()
        self.samples: list[tuple[float, str, frozenset[str]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for reader, read in list(self.readers.items()):
                if reader in self.dead:
                    continue
                try:
                    self.samples.append((time.monotonic(), reader, read(reader)))
                except (httpx.HTTPError, ValueError):
                    pass
            time.sleep(0.2)

    def when(self, reader: str, after: float, test: object) -> float | None:
        for t, r, workers in self.samples:
            if r == reader and t >= after and test(workers):  # type: ignore[operator]
                return t
        return None


def test_chaos_kill_a_nats_node_a_controller_an_api_server_and_a_worker(
        cluster: NatsCluster, procs: Procs) -> None:
    b = on(cluster, "chaos")
    controllers = [procs.controller(extra=b) for _ in range(2)]
    workers = [procs.worker(NOWHERE, "smol", wait=False, extra=b) for _ in range(3)]
    apis = [procs.api(NOWHERE, extra=b) for _ in range(3)]
    names = frozenset(url for _, url in workers)
    api_urls = [url for _, url in apis]
    ctl_urls = [url for _, url in controllers]
    wait_for(lambda: all(api_workers(a) == names for a in api_urls)
             and all(controller_workers(c) == names for c in ctl_urls), 180,
             "every worker in every table")
    load = Load(api_urls)
    monitor = Monitor(api_urls, ctl_urls)
    monitor.thread.start()
    threads = load.start()
    kills: dict[str, float] = {}
    leader = cluster.leader("chaos")
    victim = workers[0][1]
    try:
        time.sleep(4)
        kills["NATS node " + str(leader)] = time.monotonic()
        cluster.kill(cluster.index(leader or "n1"))
        time.sleep(7)
        kills["controller"] = time.monotonic()
        monitor.dead.add(ctl_urls[0])
        controllers[0][0].kill()
        time.sleep(3)
        kills["API server"] = time.monotonic()
        monitor.dead.add(api_urls[0])
        apis[0][0].kill()
        time.sleep(4)
        kills["worker"] = time.monotonic()
        workers[0][0].kill()
        time.sleep(LEASE + 3)
        port = int(victim.rsplit(":", 1)[1])
        back = time.monotonic()
        procs.worker(NOWHERE, "smol", port=port, wait=False, extra=b)
        live = [a for a in api_urls[1:]] + ctl_urls[1:]
        wait_for(lambda: all(victim in monitor.readers[r](r) for r in live), 120,
                 "the restarted worker in every table")
        time.sleep(2)
    finally:
        load.stop.set()
        for t in threads:
            t.join(90)
        monitor.stop.set()
        monitor.thread.join(10)
        for i, n in enumerate(cluster.nodes):
            if n.proc is None or n.proc.poll() is not None:
                cluster.restart(i)

    # requests: every one not in flight at a kill succeeded; the others ended cleanly
    def in_flight(r: Result) -> bool:
        return any(r.start < t < r.end for t in kills.values())

    settled = [r for r in load.results if not in_flight(r)]
    caught = [r for r in load.results if in_flight(r)]
    failed = [r for r in settled if not r.ok]
    unclean = [r for r in caught if not r.ok and not r.clean
               and not (r.api == api_urls[0] and r.start < kills["API server"] < r.end)]
    # the dead worker left every table within its lease, all within 2 s of each other
    gone = {r: monitor.when(r, kills["worker"], lambda w: victim not in w) for r in live}
    joined = {r: monitor.when(r, back, lambda w: victim in w) for r in live}
    # no live worker ever left a table (the NATS node's death included)
    lost = [(round(t - kills["worker"], 1), r, sorted(names - w)) for t, r, w in monitor.samples
            if not (names - {victim}) <= w]
    report = {
        "requests": len(load.results), "ok": sum(r.ok for r in load.results),
        "in flight at a kill": len(caught),
        "in flight and failed": [(r.what, r.api) for r in caught if not r.ok],
        "moved to another API server": sum(r.moved for r in load.results),
        "kill times (s from the first)": {k: round(t - min(kills.values()), 1)
                                          for k, t in kills.items()},
        "worker gone from each table after (s)": {
            r: None if t is None else round(t - kills["worker"], 2) for r, t in gone.items()},
        "worker back in each table after its restart (s)": {
            r: None if t is None else round(t - back, 2) for r, t in joined.items()},
    }
    print("\nchaos report:", json.dumps(report, indent=1))
    assert not failed, [(r.what, r.api) for r in failed][:5]
    assert not unclean, [(r.what, r.api) for r in unclean][:5]
    assert len(settled) >= 2 * load.clients, report
    assert api_urls[0] in load.dead and sum(r.moved for r in load.results) >= 1, report
    assert not lost, lost[:5]
    assert all(t is not None for t in gone.values()), report
    gone_t = [t for t in gone.values() if t is not None]
    assert max(gone_t) - kills["worker"] <= LEASE + 1.0, report
    assert max(gone_t) - min(gone_t) <= 2.0, report
    joined_t = [t for t in joined.values() if t is not None]
    assert len(joined_t) == len(live) and max(joined_t) - min(joined_t) <= 2.0, report


def test_registry_flags_reach_the_fastchat_entry_points() -> None:
    """`python -m llmrelay.serve.*` takes --registry too (same parsers)."""
    out = subprocess.run([sys.executable, "-m", "llmrelay.serve.openai_api_server", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert "--registry" in out.stdout

