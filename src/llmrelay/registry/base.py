"""The registry interface (the two roles) and the NATS registry's settings.

`Membership` is what a worker holds: publish my record, renew it every heartbeat, withdraw it.
`TableFeed` is what an API server holds: a live copy of every worker record applied to its
worker table. The embedded implementations are `worker.lifecycle.ControllerLink` and
`api.feed.ControllerFeed`; the NATS ones `registry.member.BucketMembership` and
`api.registryfeed.RegistryFeed`. A controller with `--registry` reads the same view
(`controller/bucket.py`).

`RegistryConfig` is what `--registry` and its credentials flags say. No server import here.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

USER_ENV = "LLMRELAY_REGISTRY_USER"
PASSWORD_ENV = "LLMRELAY_REGISTRY_PASSWORD"
TOKEN_ENV = "LLMRELAY_REGISTRY_TOKEN"
REPLICAS_ENV = "LLMRELAY_REGISTRY_REPLICAS"
DEFAULT_BUCKET = "llmrelay"


class Membership(Protocol):
    """A worker's record in the registry."""

    registered: bool

    async def run(self) -> None:
        """Publish the record, then renew it every heartbeat interval, until cancelled."""

    async def deregister(self) -> None:
        """Withdraw the record now (shutdown), so no new work is routed here."""


class TableFeed(Protocol):
    """Keeps an API server's worker table (api/table.py) up to date from the registry."""

    table: Any  # the api.table.WorkerTable it applies the records to

    async def fetch_once(self) -> bool:
        """Bring the table up to date once; False if the registry could not be read."""

    async def read(self) -> tuple[str, dict[str, Any]] | None:
        """(where from, the whole table in `/worker_table`'s shape), None when unreadable."""

    def start(self) -> None:
        """Keep the table up to date in the background."""

    async def aclose(self) -> None:
        """Stop, and leave the registry."""


class RegistryError(Exception):
    """The registry cannot be used as configured; the message says why and what to do."""


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url if "//" in url else "nats://" + url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class RegistryConfig:
    """A NATS registry: server URLs, credentials, TLS, the bucket's name and replicas."""

    servers: list[str]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    bucket: str = DEFAULT_BUCKET
    replicas: int | None = None  # None: 3 when the cluster has 3 nodes or more, else 1

    @classmethod
    def parse(cls, servers: str, user: str | None = None, password: str | None = None,
              token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
              tls_key: str | None = None, bucket: str | None = None) -> RegistryConfig:
        """From `--registry` and its flags; credentials default to LLMRELAY_REGISTRY_USER,
        _PASSWORD and _TOKEN (a URL's own `user:password@` wins over both)."""
        urls = [u.strip() for u in servers.split(",") if u.strip()]
        if not urls:
            raise RegistryError("--registry needs at least one NATS URL, e.g. nats://host:4222")
        for u in urls:
            scheme = urlsplit(u).scheme
            if scheme not in ("nats", "tls"):
                raise RegistryError(f"--registry: {_strip_userinfo(u)!r} is not a nats:// or "
                                    "tls:// URL")
        replicas = os.environ.get(REPLICAS_ENV, "")
        return cls(
            servers=urls,
            user=user if user is not None else os.environ.get(USER_ENV) or None,
            password=password if password is not None else os.environ.get(PASSWORD_ENV) or None,
            token=token if token is not None else os.environ.get(TOKEN_ENV) or None,
            tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            bucket=bucket or DEFAULT_BUCKET,
            replicas=int(replicas) if replicas.isdigit() else None,
        )

    @classmethod
    def from_args(cls, args: Any) -> RegistryConfig | None:
        """From a command's parsed flags; None when `--registry` was not given (embedded)."""
        servers = getattr(args, "registry", None)
        if not servers:
            return None
        return cls.parse(servers, args.registry_user, args.registry_password,
                         args.registry_token, args.registry_tls_ca, args.registry_tls_cert,
                         args.registry_tls_key, args.registry_bucket)

    def describe(self) -> str:
        """The server URLs without credentials, for logs and messages."""
        return ",".join(_strip_userinfo(u) for u in self.servers)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A TLS context when a CA, a client certificate or a tls:// URL asks for one."""
        if not (self.tls_ca or self.tls_cert or any(u.startswith("tls://") for u in self.servers)):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (credentials and TLS only)."""
        opts: dict[str, Any] = {"servers": list(self.servers)}
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token:
            opts["token"] = self.token
        ctx = self.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
        return opts


def public_address(host: str, port: int, cfg: RegistryConfig | None, https: bool = False) -> str:
    """How others reach this process (its presence record): http://HOST:PORT, or, when it
    listens on every interface, the address its host uses towards the registry."""
    scheme = "https" if https else "http"
    if host not in ("0.0.0.0", "::", ""):
        return f"{scheme}://{host}:{port}"
    target = urlsplit(cfg.servers[0]).hostname if cfg is not None else None
    ip = "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target or "127.0.0.1", 9))
            ip = s.getsockname()[0]
    except OSError:
        pass
    return f"{scheme}://{ip}:{port}"
