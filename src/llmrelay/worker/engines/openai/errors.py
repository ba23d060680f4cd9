"""Upstream failures -> EngineErrors with the FastChat code of the same meaning.

Our API server maps the codes back: an upstream 400/422 stays a 400 (`context_length_exceeded`
kept), a 404 for a model is a 404, a 429 makes it try another worker and then answer 429, a 5xx,
a refused key or a transport failure makes it try another worker and then answer 503.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import openai

from llmrelay.protocol import ErrorCode
from llmrelay.worker.engines.base import EngineError

T = TypeVar("T")

# How a server that drops a connection without answering shows up (a pooled connection it had
# closed, or llama.cpp's server giving up on a request before its first token).
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def map_error(status: int, text: str, what: str = "request") -> EngineError:
    """An upstream HTTP error -> an EngineError with the FastChat code of the same meaning."""
    message, code = text.strip()[:500], ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or message)
            code = str(err.get("code") or "")
        elif isinstance(err, str):
            message = err
        if isinstance(body.get("detail"), str):  # FastAPI's shape
            message = body["detail"]
    low = message.lower()
    if code == "context_length_exceeded" or "context length" in low or "context window" in low:
        return EngineError(message, int(ErrorCode.CONTEXT_OVERFLOW))
    if status in (400, 413, 422):
        return EngineError(message or f"the upstream refused the {what} ({status})",
                           int(ErrorCode.VALIDATION_TYPE_ERROR))
    if status == 404:
        if code == "model_not_found" or "model" in low:
            return EngineError(message, int(ErrorCode.INVALID_MODEL))
        return EngineError(f"the upstream server does not serve this {what} ({message})",
                           int(ErrorCode.VALIDATION_TYPE_ERROR))
    if status == 429:  # the upstream is full or rate-limited: the API server tries another worker
        return EngineError(f"the upstream server is busy: {message}",
                           int(ErrorCode.ENGINE_OVERLOADED))
    if status in (401, 403):  # our key, not the client's: a server-side failure
        return EngineError(f"the upstream server refused this worker's key ({status}): check "
                           "--upstream-key", int(ErrorCode.INTERNAL_ERROR))
    return EngineError(f"the upstream server failed ({status}): {message}",
                       int(ErrorCode.INTERNAL_ERROR))


def cause_name(e: BaseException) -> str:
    """The name of the transport failure under an SDK error (`ConnectError`, `ReadTimeout`)."""
    cause = e.__cause__ or e.__context__
    return type(cause).__name__ if isinstance(cause, Exception) else type(e).__name__


def describe(e: BaseException) -> str:
    """An error in a few words for logs and status: a transport failure by its cause."""
    if isinstance(e, openai.APIConnectionError) and isinstance(e.__cause__, Exception):
        e = e.__cause__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def is_connect_failure(e: BaseException) -> bool:
    """Nothing listens there (or it does not accept): the upstream is down."""
    return isinstance(e.__cause__ or e.__context__, (httpx.ConnectError, httpx.ConnectTimeout))


def is_dropped(e: BaseException) -> bool:
    """The server closed the connection without an answer (not a timeout, not a refusal)."""
    return (isinstance(e, openai.APIConnectionError) and not isinstance(e, openai.APITimeoutError)
            and isinstance(e.__cause__ or e.__context__, DROPPED))


async def once_more_if_dropped(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, and once more if the server closed the connection without answering (a pooled
    connection it had dropped, e.g. after a failed stream or a restart): on a new connection."""
    try:
        return await call()
    except openai.APIConnectionError as e:
        if not is_dropped(e):
            raise
    return await call()


def status_error(e: openai.APIStatusError, what: str) -> EngineError:
    """An HTTP error status from the upstream, with its body."""
    try:
        text = e.response.text
    except httpx.ResponseNotRead:  # not read: the SDK's own reading of the body
        text = json.dumps(e.body) if e.body is not None else e.message
    return map_error(e.status_code, text, what)


def event_error(e: openai.APIError) -> EngineError:
    """An error event in the middle of a stream (`data: {"error": {...}}`): a numeric `code`
    is an HTTP status, anything else counts as a server failure."""
    body: Any = e.body
    code = str(body.get("code", "")) if isinstance(body, dict) else ""
    status = int(code) if code.isdigit() else 500
    return map_error(status, json.dumps({"error": body if body is not None else e.message}),
                     "generation")
