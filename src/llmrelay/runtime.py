"""Running an ASGI app: uvicorn with our logging, the bind warning, and SSL from FastChat's env vars."""

from __future__ import annotations

import logging
import os
from typing import Any

import uvicorn

log = logging.getLogger("llmrelay")

PUBLIC_HOSTS = {"0.0.0.0", "::", ""}


def warn_public_bind(host: str, what: str, protected: bool) -> None:
    """Binding every interface without protection is allowed, but said out loud."""
    if host in PUBLIC_HOSTS and not protected:
        log.warning(
            "%s listens on all interfaces (%s) without authentication: anyone who can reach this "
            "machine can use it. Bind 127.0.0.1 or configure keys.",
            what,
            host or "*",
        )


def serve(app: Any, host: str, port: int, log_level: str = "info", ssl: bool = False) -> None:
    """Run `app` until SIGINT/SIGTERM (uvicorn handles both, running the app's shutdown)."""
    kwargs: dict[str, Any] = {}
    if ssl:
        kwargs["ssl_keyfile"] = os.environ["SSL_KEYFILE"]
        kwargs["ssl_certfile"] = os.environ["SSL_CERTFILE"]
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=log_level.lower() == "debug",
        timeout_graceful_shutdown=10,
        **kwargs,
    )
