"""Wire facts shared by the controller, the workers and the API server.

FastChat 0.2.36's internal protocol (see docs/architecture.md): JSON bodies, a worker stream of
JSON objects each followed by a NUL byte, FastChat's numeric error codes. Our additions are
optional fields and new endpoints; a worker lists the additions it speaks under
``llmrelay.extensions`` in its status so an API server knows how to talk to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from enum import IntEnum
from typing import Any

import orjson

# Heartbeats every few seconds (FastChat: 45 s); a worker silent for EXPIRY_BEATS intervals is dropped.
DEFAULT_HEARTBEAT_INTERVAL = float(os.environ.get("LLMRELAY_HEARTBEAT_INTERVAL", "3"))
EXPIRY_BEATS = 3

# Extensions a worker may announce in its status (`llmrelay.extensions`).
EXT_MESSAGES = "messages"  # accepts chat `messages` and renders them with the model's template
EXT_DELTA = "delta"  # `delta: true` makes `text` in each frame the new text only
EXT_REQUEST_ID = "request_id"  # accepts `request_id` and logs it
EXT_TOKEN_IDS = "prompt_token_ids"  # accepts a prompt as token ids
EXT_TOP_LOGPROBS = "top_logprobs"  # per-token logprob entries with alternatives
OUR_EXTENSIONS = [EXT_MESSAGES, EXT_DELTA, EXT_REQUEST_ID, EXT_TOKEN_IDS, EXT_TOP_LOGPROBS]


class ErrorCode(IntEnum):
    """FastChat's error codes, carried in `error_code` of worker frames."""

    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


SERVER_ERROR_MSG = "The worker failed while generating."


def dumps(obj: Any) -> bytes:
    """JSON as UTF-8 bytes, compact. orjson: ~15x faster than json on our small frames and
    chunks, which every token goes through three times. What orjson refuses (an integer over
    64 bits, a lone surrogate in a string) goes through json, with ASCII escapes."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    """JSON from bytes or text: orjson, else json (which also reads NaN and Infinity, as
    Python workers such as FastChat's may write them). Raises ValueError."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def frame(obj: dict[str, Any]) -> bytes:
    """Encode one worker stream frame: JSON followed by a NUL byte."""
    return dumps(obj) + b"\0"


async def iter_frame_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[dict[str, Any]]]:
    """Split a NUL-delimited byte stream into decoded JSON frames (empty pieces skipped), one
    list per piece of the stream that completed frames: the frames that arrived together, so a
    reader can pass them on together (one write instead of one per frame)."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        if b"\0" not in chunk:
            continue
        *pieces, buf = buf.split(b"\0")
        batch = [loads(piece) for piece in pieces if piece.strip()]
        if batch:
            yield batch
    if buf.strip():
        # A body without NUL (an HTTP error page, a FastChat error object): pass it on as one frame.
        try:
            obj = loads(buf)
        except ValueError:
            obj = {"text": buf.decode(errors="replace")[:500], "error_code": 50001}
        if isinstance(obj, dict):
            yield [obj]


def worker_extensions(status: dict[str, Any]) -> set[str]:
    """The llmrelay extensions a worker announced in its status (empty for FastChat workers)."""
    ours = status.get("llmrelay") if isinstance(status, dict) else None
    if isinstance(ours, dict):
        return set(ours.get("extensions") or [])
    return set()
