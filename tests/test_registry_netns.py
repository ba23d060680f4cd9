"""A network partition between simulated hosts (Linux network namespaces on a bridge the test
makes, with addresses of its own; nats_cluster.Hosts): each of the 3 NATS nodes, the worker and
each of the 2 API servers runs on a host of its own and they talk only over the bridge.

The worker's link is set down: it leaves every API server's table within its lease; set up
again: it is back in every table within about one heartbeat, and serves again. Skipped, with
the reason, where namespaces cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from nats_cluster import Hosts, NatsCluster

from conftest import HEARTBEAT, Proc, wait_for

WHY_NOT = Hosts.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
LEASE = float(HEARTBEAT) * 3


class HostProc(Proc):
    """An llmrelay process on a simulated host (`ip netns exec`)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, netns: str) -> None:
        super().__init__(name, argv, log_dir)
        self.netns = netns

    def start(self) -> HostProc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "llmrelay.cli",
                 *self.argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return self


@pytest.fixture()
def hosts() -> Iterator[Hosts]:
    h = Hosts(6).create()  # 0-2: NATS nodes, 3: the worker, 4-5: API servers
    try:
        yield h
    finally:
        h.destroy()


def names_in(api: str) -> set[str]:
    return {w["address"] for w in httpx.get(api + "/api/workers", timeout=1).json()["workers"]}


def times_until(apis: list[str], check: object, timeout: float) -> list[float]:
    """Seconds from now until `check(names_in(api))` holds, for each API server (polled
    together every 50 ms)."""
    start = time.monotonic()
    found: dict[str, float] = {}
    while len(found) < len(apis):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {found}")
        for api in apis:
            if api in found:
                continue
            try:
                if check(names_in(api)):  # type: ignore[operator]
                    found[api] = time.monotonic() - start
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        time.sleep(0.05)
    return [found[a] for a in apis]


def test_partitioned_worker_leaves_within_its_lease_and_rejoins(hosts: Hosts, tmp_path: Path
                                                                 ) -> None:
    cluster = NatsCluster(tmp_path, hosts=hosts.addresses[:3], netns=hosts.spaces[:3])
    procs: list[Proc] = []

    def start(name: str, host: int, argv: list[str]) -> str:
        procs.append(HostProc(name, argv, tmp_path, hosts.spaces[host]).start())
        return f"http://{hosts.addresses[host]}:{argv[argv.index('--port') + 1]}"

    try:
        cluster.start()
        reg = [*cluster.args, "--registry-bucket", "partition"]
        worker = start("worker", 3, [
            "worker", "--host", hosts.addresses[3], "--port", "21002", *reg,
            "--model-path", "smollm2", "--model-names", "smol", "--heartbeat-interval",
            HEARTBEAT, "--context-length", "2048", "--n-threads", "1"])
        apis = [start(f"api-{i}", i, ["api", "--host", hosts.addresses[i], "--port", "8000",
                                      *reg]) for i in (4, 5)]
        wait_for(lambda: all(worker in names_in(a) for a in apis), 120,
                 "the worker in both API servers' tables")
        hosts.link(3, up=False)
        gone = times_until(apis, lambda names: worker not in names, LEASE + 5)
        time.sleep(max(0.0, LEASE + 1.5 - max(gone)))  # a partition longer than the lease
        hosts.link(3, up=True)
        back = times_until(apis, lambda names: worker in names, 30)
        print(f"\npartition: the worker left the tables after {[round(g, 2) for g in gone]} s "
              f"(lease {LEASE:g} s); rejoined {[round(b, 2) for b in back]} s after the link "
              f"came back (heartbeat {HEARTBEAT} s)")
        assert max(gone) <= LEASE + 1.0
        assert max(back) <= float(HEARTBEAT) + 1.5
        for api in apis:  # and it serves again, across the bridge
            r = httpx.post(api + "/v1/chat/completions", timeout=60, json={
                "model": "smol", "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text
    finally:
        for p in reversed(procs):
            p.stop(timeout=5)
        cluster.stop()
