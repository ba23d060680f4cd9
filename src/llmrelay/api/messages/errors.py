"""Anthropic's error shape and event stream for the Messages API's routes.

`{"type": "error", "error": {"type": ..., "message": ...}}` with Anthropic's statuses: 400
invalid_request_error, 401 authentication_error, 403 permission_error, 404 not_found_error, 413
request_too_large, 429 rate_limit_error (a key at its limit), 500 api_error, 504 timeout_error,
529 overloaded_error. The pipeline's errors keep their status, except that every worker of the
model being full (OpenAI's 429 `rate_limit_exceeded` on the other routes) is Anthropic's 529
overloaded_error, which its SDKs retry; other 4xx are invalid_request_error, other 5xx (503: no
worker of the model is up) api_error. Mid-stream, an error is an `event: error` with the same
body, and the stream ends.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from llmrelay.api.errors import APIError
from llmrelay.api.pipeline import SSEFormat
from llmrelay.protocol import dumps

OVERLOADED = 529
TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
         429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
         OVERLOADED: "overloaded_error"}


def status_of(e: APIError) -> int:
    return OVERLOADED if e.overloaded else e.status


def body(e: APIError) -> dict[str, Any]:
    status = status_of(e)
    kind = TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    # request_id: null, as Anthropic's schema allows; the id is in the X-Request-ID header
    return {"type": "error", "error": {"type": kind, "message": e.message}, "request_id": None}


def response(e: APIError) -> JSONResponse:
    """The HTTP error (errors.install's Shape for the Messages API's paths)."""
    return JSONResponse(body(e), status_code=status_of(e), headers=e.headers)


def event(kind: str, data: Any) -> bytes:
    """One SSE event with its `event:` line (Anthropic's SDKs skip events without one)."""
    return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _chunk(c: Any) -> bytes:
    return event(c.type, c)


def _error(e: APIError) -> bytes:
    return event("error", body(e))


ANTHROPIC_SSE = SSEFormat(chunk=_chunk, error=_error, done=b"")
