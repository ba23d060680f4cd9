"""The cluster secret: what keeps strangers from registering workers or reading the table.

FastChat's controller accepted any registration from anyone (CVE-2024-10044: SSRF and model
spoofing). When a registration token is configured (`--registration-token` or the environment
variable LLMRELAY_REGISTRATION_TOKEN), every controller and worker endpoint except the liveness
check requires `Authorization: Bearer <token>`; workers and API servers send it. Compared in
constant time, never logged.
"""

from __future__ import annotations

import hmac
import os

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from llmrelay.protocol import dumps, error_body

TOKEN_ENV = "LLMRELAY_REGISTRATION_TOKEN"


def token_from(flag: str | None, controller: str | None = None) -> str | None:
    """The configured token: the flag, else the environment; empty means none.

    With neither, a process that talks to `controller` (status, a worker or API server started
    by hand) uses the token of the stack `llmrelay up` runs there, from its token file
    (llmrelay.stackstate). A controller never looks there: it would guard itself with it.
    """
    token = flag if flag is not None else os.environ.get(TOKEN_ENV)
    if token is None and controller:
        from llmrelay.stackstate import read_token

        token = read_token(controller)
    return token.strip() or None if token else None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def token_matches(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


class TokenGuard:
    """ASGI middleware: 401 unless the request carries the cluster token (when one is set)."""

    def __init__(self, app: ASGIApp, token: str | None, open_paths: frozenset[str] = frozenset()
                 ) -> None:
        self.app = app
        self.token = token
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.token or scope["path"] in self.open_paths
                or token_matches(Headers(scope=scope).get("authorization", ""), self.token)):
            await self.app(scope, receive, send)
            return
        body = dumps(error_body(
            "This endpoint needs the cluster's registration token (Authorization: Bearer "
            "<token>; see --registration-token).", code="invalid_registration_token"))
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
