"""API keys on requests: `Authorization: Bearer <key>` -> the caller's `Key` (access.py looks
it up), kept on the request (`request.state.key`, read with `caller`) and in its record
(observe.py) for the limits, the usage and fair sharing on the workers. From then on only the
key's name is used; the secret is never logged."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request

from llmrelay.api.access import Access
from llmrelay.api.keys import Key
from llmrelay.api.observe import note_key


def caller(request: Request) -> Key | None:
    """The request's API key (None on a server without keys)."""
    return getattr(request.state, "key", None)


def guard(access: Access) -> list[Any]:
    """The route dependencies that check API keys; none when the server has no keys (nothing
    to solve on every request)."""
    if not access.enabled:
        return []

    async def authorized(request: Request) -> None:  # async: a sync one costs a thread hop
        key = access.authenticate(request.headers.get("authorization", ""))
        request.state.key = key
        note_key(key)

    return [Depends(authorized)]
