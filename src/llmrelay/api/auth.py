"""API keys: `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`), compared in
constant time; keys are never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from llmrelay.api.errors import APIError


class KeyChecker:
    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, request: Request) -> None:
        if not self.keys:
            return
        header = authorization(request)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Send it as "
                           "'Authorization: Bearer YOUR_KEY' (or 'x-api-key: YOUR_KEY').",
                           code="invalid_api_key")
        given = token.strip().encode()
        ok = False
        for key in self.keys:  # no early exit: every key is compared
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def authorization(request: Request) -> str:
    """The request's `Authorization` header; without one, Anthropic's `x-api-key` header (sent
    by its older SDKs and most of its clients) as `Bearer <key>`, checked the same way."""
    header = request.headers.get("authorization", "")
    if not header:
        key = request.headers.get("x-api-key", "").strip()
        if key:
            return f"Bearer {key}"
    return header
