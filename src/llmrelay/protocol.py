"""Wire facts shared by the controller, the workers and the API server.

FastChat 0.2.36's internal protocol (see docs/architecture.md): JSON bodies, a worker stream of
JSON objects each followed by a NUL byte, FastChat's numeric error codes. Our additions are
optional fields and new endpoints; a worker lists the additions it speaks under
``llmrelay.extensions`` in its status so an API server knows how to talk to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from enum import IntEnum
from typing import Annotated, Any, Literal, TypedDict

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Heartbeats every few seconds (FastChat: 45 s); a worker silent for EXPIRY_BEATS intervals is dropped.
DEFAULT_HEARTBEAT_INTERVAL = float(os.environ.get("LLMRELAY_HEARTBEAT_INTERVAL", "3"))
EXPIRY_BEATS = 3

# Extensions a worker may announce in its status (`llmrelay.extensions`).
EXT_MESSAGES = "messages"  # accepts chat `messages` and renders them with the model's template
EXT_DELTA = "delta"  # `delta: true` makes `text` in each frame the new text only
EXT_REQUEST_ID = "request_id"  # accepts `request_id` and logs it
EXT_TOKEN_IDS = "prompt_token_ids"  # accepts a prompt as token ids
EXT_TOP_LOGPROBS = "top_logprobs"  # per-token logprob entries with alternatives
EXT_TOOLS = "tools"  # tools, tool_choice, response_format, logit_bias; frames carry tool_calls
EXT_FAIRNESS = "fairness"  # `key` (the API key's name) and `priority` order the worker's queue
EXT_CONTINUATION = "continuation"  # delta frames carry `token_ids`; `generated_token_ids` resumes
# `/tokenize` and `/detokenize`; `/count_token` takes chat `messages` with `tools`; a frame that
# ended at a stop string names it (`stop_sequence`)
EXT_TOKENIZE = "tokenize"
# `reasoning` ({"budget": N, "enabled": bool}) asks a worker with a reasoning parser to split the
# reasoning from the answer: frames then carry it apart (`reasoning`), and `usage` counts
# `reasoning_tokens`
EXT_REASONING = "reasoning"
# A user message's `content` may be a list of parts, `{"type": "text", "text": ...}` and
# `{"type": "image", "data": <base64>, "mime": "image/png"}` (fetched and checked by the API
# server, api/images.py); announced with the `vision` feature by a worker whose model reads
# images, and only such a worker is sent any (docs/images.md)
EXT_IMAGES = "images"
OUR_EXTENSIONS = [EXT_MESSAGES, EXT_DELTA, EXT_REQUEST_ID, EXT_TOKEN_IDS, EXT_TOP_LOGPROBS,
                  EXT_TOOLS, EXT_FAIRNESS, EXT_CONTINUATION, EXT_TOKENIZE, EXT_REASONING]


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


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, `{"error": {message, type, param, code}}`, which every part of
    llmrelay answers with (the API server, the controller, the on-demand host, the token
    guard)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _plain(obj: Any) -> Any:
    """json's fallback for what it cannot write itself: dataclasses (orjson writes them)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> bytes:
    """JSON as UTF-8 bytes, compact; dataclasses are written as objects. orjson: ~15x faster
    than json on our small frames and chunks, which every token goes through three times. What
    orjson refuses (an integer over 64 bits, a lone surrogate in a string) goes through json,
    with ASCII escapes."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), default=_plain).encode()


def loads(data: bytes | str) -> Any:
    """JSON from bytes or text: orjson, else json (which also reads NaN and Infinity, as
    Python workers such as FastChat's may write them). Raises ValueError, also for JSON nested
    too deeply to read (json's RecursionError)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("the JSON nests arrays and objects too deeply") from None


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


# ---- the generation request: FastChat's params plus our optional fields ------------------------


class ParamError(ValueError):
    """A generation request the worker refuses before it starts; `code` is FastChat's."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.VALIDATION_TYPE_ERROR) -> None:
        super().__init__(message)
        self.code = code


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


class ReasoningParams(BaseModel):
    """Our `reasoning` extension: split the reasoning from the answer (a worker without a
    reasoning parser ignores it), within a budget of reasoning tokens (null: none), and switch
    thinking off (`enabled: false`) where the model's template can."""

    model_config = ConfigDict(extra="ignore", strict=True)

    budget: Annotated[int, Field(ge=0)] | None = None
    enabled: bool | None = None


class GenerateParams(BaseModel):
    """The body of `/worker_generate_stream` and `/worker_generate`.

    FastChat's API server sends `prompt` and its sampling fields (a null means the default);
    ours sends `messages` (rendered by the worker with the model's template), `delta` and
    `request_id` to workers that announce those extensions. Types are strict (a string is not
    a number); fields FastChat sends that no engine reads (`images`, `best_of`,
    `use_beam_search`) are ignored. `parse` turns a refusal into a ParamError with FastChat's
    code: 40302 for a value out of range, 40001 for the rest.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: Annotated[int, Field(ge=0)] | None = 256  # null: the rest of the context
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # k alternatives per token
    echo: bool = True  # FastChat's worker echoes the prompt unless told not to
    delta: bool = False  # our extension: `text` in each frame is the new text only
    request_id: str | None = None
    # Our `tools` extension (OpenAI's fields, checked by our API server before they get here).
    tools: list[dict[str, Any]] | None = None  # function tools, OpenAI's chat shape
    tool_choice: str | dict[str, Any] | None = None  # none, auto, required, or a named function
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None  # json_object or json_schema
    logit_bias: dict[str, float] | None = None  # token id (as JSON keys are) -> bias
    # Continuation (our `continuation` extension): the tokens an earlier worker generated for
    # this request; the worker replays them (no text sent for them) and goes on from there.
    generated_token_ids: list[int] | None = None
    # Fair sharing (our `fairness` extension): the API key's name, never the key itself.
    key: str | None = None
    priority: Literal["interactive", "batch"] | None = None
    reasoning: ReasoningParams | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateParams:
        if self.messages is None and self.prompt_token_ids is None and self.prompt is None:
            raise ValueError("prompt must be a string (or give messages or prompt_token_ids)")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @classmethod
    def parse(cls, body: Any) -> GenerateParams:
        if not isinstance(body, dict):
            raise ParamError("the body must be a JSON object")
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith(
                ("str", "list", "int", "float", "dict", "function")))
            code = (ErrorCode.PARAM_OUT_OF_RANGE if first.get("type") in _RANGE_ERRORS
                    else ErrorCode.VALIDATION_TYPE_ERROR)
            message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            raise ParamError(f"{where}: {message}" if where else message, code) from None

    def wire(self) -> dict[str, Any]:
        """The JSON body, without the fields left at None."""
        return self.model_dump(exclude_none=True)


# ---- frames: what a worker streams back ---------------------------------------------------------


class _Reasoned(TypedDict, total=False):
    reasoning_tokens: int  # of the completion tokens, those of the reasoning (`reasoning`)


class Usage(_Reasoned):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class LogprobEntry(TypedDict):
    """One generated token's log-probability, in OpenAI's chat shape (our delta frames)."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class DeltaLogprobs(TypedDict, total=False):
    content: list[LogprobEntry]
    text_offset: list[int]  # /worker_generate's whole answer: each token's start in `text`


class LegacyLogprobs(TypedDict):
    """FastChat's cumulative frames and OpenAI's legacy completions: parallel lists."""

    text_offset: list[int]
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


class ToolCallWire(TypedDict, total=False):
    """A piece of a tool call in a delta frame: the first of a call has `id` and `name`, the
    others pieces of `arguments`; in a whole answer, the whole call."""

    index: int
    id: str
    name: str
    arguments: str


class Frame(TypedDict, total=False):
    """One frame of a worker stream (JSON + NUL), or /worker_generate's whole answer.
    `error_code` 0 is success; otherwise `text` is the error's message. `finish_reason`
    `tool_calls`: the answer ended after calling tools. `stop_sequence` (ours, on the last
    frame): the stop string that ended it, when the engine knows."""

    text: str
    error_code: int
    usage: Usage
    finish_reason: str | None
    logprobs: DeltaLogprobs | LegacyLogprobs | None
    tool_calls: list[ToolCallWire]
    token_ids: list[int]  # delta frames: the tokens generated since the last frame
    stop_sequence: str
    param: str  # an error frame (ours): the request field that was refused


def add_call_piece(calls: list[ToolCallWire], piece: ToolCallWire) -> None:
    """Join a tool call's piece (from a delta frame) into whole calls, by its index."""
    index = int(piece.get("index", 0))
    while len(calls) <= index:
        calls.append({"index": len(calls), "id": "", "name": "", "arguments": ""})
    call = calls[index]
    call["id"] = piece.get("id") or call["id"]
    call["name"] = piece.get("name") or call["name"]
    call["arguments"] += piece.get("arguments") or ""


def new_call_id() -> str:
    """A tool call's id, as OpenAI writes them."""
    return f"call_{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_frame(message: str, code: int, param: str | None = None) -> Frame:
    """An error frame; `param` (ours, optional) names the request field that was refused."""
    out: Frame = {"text": message, "error_code": int(code)}
    if param:
        out["param"] = param
    return out


# ---- logprobs: one converter each way between the two shapes ----------------------------------


def logprob_entry(token: str, logprob: float, raw: bytes | None = None,
                  top: Sequence[tuple[str, float]] = ()) -> LogprobEntry:
    """An entry from an engine's figures; `raw` is the token's bytes (default: its UTF-8)."""
    return {"token": token, "logprob": logprob,
            "bytes": list(raw if raw is not None else token.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}


def text_offsets(entries: Sequence[LogprobEntry], start: int) -> list[int]:
    """Where each entry's token starts in the text, the first at `start`, each after the last."""
    out = []
    for e in entries:
        out.append(start)
        start += len(e["token"])
    return out


def to_legacy(entries: Sequence[LogprobEntry], offsets: Sequence[int]) -> LegacyLogprobs:
    """Entries (and their text offsets) -> the legacy parallel lists."""
    return {"text_offset": list(offsets),
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries]}


def from_legacy(lp: dict[str, Any], skip: int = 0) -> tuple[list[LogprobEntry], list[int] | None]:
    """The legacy lists (FastChat's cumulative frames, an upstream's completions) -> entries
    from index `skip` on, with their text offsets when the lists carry them. A missing logprob
    (FastChat's first token) reads as 0.0."""
    tokens = [str(t) for t in lp.get("tokens") or []]
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    out: list[LogprobEntry] = []
    for i in range(skip, len(tokens)):
        value = values[i] if i < len(values) and values[i] is not None else 0.0
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(logprob_entry(tokens[i], float(value), None,
                                 [(str(t), float(v)) for t, v in top.items()]))
    offsets = lp.get("text_offset")
    given = (list(offsets[skip:]) if isinstance(offsets, list) and len(offsets) == len(tokens)
             else None)
    return out, given


def entries_of(lp: Any) -> list[LogprobEntry]:
    """Entries from either shape (an upstream server's chunk may send either)."""
    if not isinstance(lp, dict):
        return []
    if isinstance(lp.get("content"), list):
        return [logprob_entry(str(e.get("token", "")), float(e.get("logprob") or 0.0),
                              bytes(e["bytes"]) if isinstance(e.get("bytes"), list) else None,
                              [(str(t.get("token", "")), float(t.get("logprob") or 0.0))
                               for t in e.get("top_logprobs") or []])
                for e in lp["content"] if isinstance(e, dict)]
    return from_legacy(lp)[0]


# ---- the worker's status: what our API servers read from the table -----------------------------


class Features(BaseModel):
    """What a worker's engine honours, announced in its status (`llmrelay.features`) so an API
    server can refuse up front what a model cannot do. Unknown fields (a newer worker's) are kept."""

    model_config = ConfigDict(extra="allow")

    chat: bool = True  # chat messages (the model has a chat template)
    completions: bool = True  # text prompts
    prompt_token_ids: bool = False
    logprobs: bool = False  # with up to `top_logprobs` alternatives
    top_logprobs: int = 0
    seed: bool = False
    penalties: bool = False  # presence, frequency, repetition
    embeddings: bool = False
    embedding_dimensions: list[int] = Field(default_factory=list)
    continuation: bool = False  # resumes another worker's generation from its token ids
    tools: bool = False  # tools and tool_choice, with calls valid against their schemas
    json_schema: bool = False  # response_format json_object / json_schema, enforced
    logit_bias: bool = False
    tokenize: bool = False  # gives token ids of a prompt and text of token ids
    reasoning: str = ""  # the reasoning parser (deepseek_r1, qwen3, gpt_oss); "": none
    vision: bool = False  # reads images in user messages (our `images` extension)


class OurStatus(BaseModel):
    """The `llmrelay` section of our workers' status (FastChat's workers have none)."""

    model_config = ConfigDict(extra="allow")

    version: str = ""
    extensions: list[str] = Field(default_factory=list)
    engine: str = ""
    context_length: int = 0
    features: Features = Field(default_factory=Features)
    ready: bool = True  # false while an upstream server is down: route nothing here
    limit_worker_concurrency: int = 0
    running: int = 0
    served: int = 0
    pid: int = 0

    @classmethod
    def of(cls, status: Any) -> OurStatus | None:
        """The section in a worker's status; None for a FastChat worker (or one unreadable)."""
        ours = status.get("llmrelay") if isinstance(status, dict) else None
        if not isinstance(ours, dict):
            return None
        try:
            return cls.model_validate(ours)
        except ValidationError:
            return None
