"""API keys on requests: `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) ->
the caller's `Key` (access.py looks it up), kept on the request (`request.state.key`, read with
`caller`) and in its record (observe.py) for the limits, the usage and fair sharing on the
workers. From then on only the key's name is used; the secret is never logged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request
from starlette.types import Scope

from llmrelay.api.access import Access, allowed_models
from llmrelay.api.errors import APIError
from llmrelay.api.keys import Key
from llmrelay.api.observe import note_key


def caller(request: Request) -> Key | None:
    """The request's API key (None on a server without keys)."""
    return getattr(request.state, "key", None)


def authorization(request: Request) -> str:
    """The request's `Authorization` header; without one, Anthropic's `x-api-key` header (sent
    by its older SDKs and most of its clients) as `Bearer <key>`, checked the same way."""
    header = request.headers.get("authorization", "")
    if not header:
        key = request.headers.get("x-api-key", "").strip()
        if key:
            return f"Bearer {key}"
    return header


def guard(access: Access) -> list[Any]:
    """The route dependencies that check API keys; none when the server has no keys (nothing
    to solve on every request)."""
    if not access.enabled:
        return []

    async def authorized(request: Request) -> None:  # async: a sync one costs a thread hop
        key = access.authenticate(authorization(request))
        access.check_key(key)
        request.state.key = key
        note_key(key)

    return [Depends(authorized)]


def operator_guard(access: Access, what: str, scrape: bool = False) -> list[Any]:
    """The dependencies of a route only the operator may read (`what`, for the 403's message):
    with keys on, an admin key (with `scrape`, a metrics-only key too); none without keys."""
    if not access.enabled:
        return []

    async def operator(request: Request) -> None:
        key = access.authenticate(authorization(request))
        access.check_operator(key, what, scrape)
        request.state.key = key

    return [Depends(operator)]


def may_load(access: Access) -> Callable[[Scope, str], bool]:
    """For the on-demand middleware, which runs before the routes: whether a request's key may
    use a model (and so have it loaded). A request it refuses goes on to the routes, whose
    guard answers it."""
    def check(scope: Scope, model: str) -> bool:
        if not access.enabled:
            return True
        try:
            key = access.authenticate(authorization(Request(scope)))
        except APIError:
            return False
        allowed = allowed_models(key)
        return not key.metrics_only and (allowed is None or allowed(model))

    return check
