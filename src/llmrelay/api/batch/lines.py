"""A batch's input file: one JSON request a line (`custom_id`, `method`, `url`, `body`), checked
up front as OpenAI does before a batch runs. Any line that fails fails the whole batch, whose
`errors` list names each bad line (1-based) with a code and the parameter:

- `invalid_json_line`: not a JSON object; `missing_required_parameter` / `invalid_value`:
  `custom_id` missing or not a string, `method` not POST;
- `duplicate_custom_id`; `mismatched_endpoint`: `url` is not the batch's endpoint;
- the body as its endpoint would check it: the door's checks on hostile JSON (api/body.py), the
  front door's pydantic request (the same 400 message, param prefixed with `body.`), `stream`
  refused (a batch answers whole);
- `mismatched_model`: every line must ask for the same model; `model_not_found`: the model is
  unknown (or not allowed to the key), from the caller's `check_model`;
- `empty_file`, `too_many_requests` (more than `MAX_LINES` lines).

Plain Python, no I/O: the runner reads the file's bytes and hands them here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from llmrelay.api.body import check as check_hostile
from llmrelay.api.chat.protocol import ChatCompletionRequest
from llmrelay.api.completions.protocol import CompletionRequest
from llmrelay.api.embeddings.protocol import EmbeddingRequest
from llmrelay.api.errors import APIError, from_validation
from llmrelay.api.responses.protocol import ResponsesRequest

ENDPOINTS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponsesRequest,
}
MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_ERRORS = 100  # errors listed; the rest are counted in the last one's message


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as in the errors list
    custom_id: str
    body: dict[str, Any]


def error(code: str, message: str, line: int | None = None, param: str | None = None
          ) -> dict[str, Any]:
    """One entry of a batch's `errors.data` (OpenAI's BatchError)."""
    return {"code": code, "message": message, "param": param, "line": line}


def read(data: bytes) -> Iterator[Line]:
    """The lines of a file already validated (the runner, after a restart): no checks."""
    number = 0
    for raw in data.splitlines():
        number += 1
        if raw.strip():
            obj = json.loads(raw)
            yield Line(number, obj["custom_id"], obj["body"])


def parse_request(endpoint: str, body: dict[str, Any]) -> BaseModel:
    """The front door's request for a line's body; raises APIError (the door's 400)."""
    try:
        return ENDPOINTS[endpoint].model_validate(body)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False)) from None


@dataclass
class Checked:
    lines: list[Line]
    errors: list[dict[str, Any]]
    model: str | None


def validate(data: bytes, endpoint: str,
             check_model: Callable[[str], None] | None = None) -> Checked:
    """Every line of `data` checked for a batch to `endpoint` (see the module docstring);
    `check_model` raises APIError for a model the batch may not use."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    number = 0
    for raw in data.splitlines():
        number += 1
        if not raw.strip():
            continue
        if len(lines) >= MAX_LINES:
            errors.append(error("too_many_requests", f"A batch holds at most {MAX_LINES} "
                                "requests.", number))
            break
        problem = _check_line(raw, number, endpoint, seen)
        if isinstance(problem, dict):
            errors.append(problem)
            continue
        line = problem
        asked = str(line.body.get("model", ""))
        if model is None:
            model = asked
            if check_model is not None:
                try:
                    check_model(asked)
                except APIError as e:
                    errors.append(error(e.code or "model_not_found", e.message, number,
                                        "body.model"))
        elif asked != model:
            errors.append(error("mismatched_model", f"Every request of a batch must use the same "
                                f"model: this line asks for '{asked[:100]}', the first for "
                                f"'{model[:100]}'.", number, "body.model"))
            continue
        lines.append(line)
    if not lines and not errors:
        errors.append(error("empty_file", "The input file holds no request."))
    if len(errors) > MAX_ERRORS:
        more = len(errors) - MAX_ERRORS
        errors = errors[:MAX_ERRORS]
        errors[-1] = {**errors[-1], "message": errors[-1]["message"]
                      + f" ({more} more lines have errors)"}
    return Checked(lines, errors, model)


def _check_line(raw: bytes, number: int, endpoint: str, seen: set[str]
                ) -> Line | dict[str, Any]:
    """The line, or the error that names what is wrong with it."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        return error("invalid_json_line", "This line is not parseable as a JSON object.",
                     number)
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return error("missing_required_parameter", "Each line needs a custom_id (a non-empty "
                     "string).", number, "custom_id")
    if cid in seen:
        return error("duplicate_custom_id", f"The custom_id '{cid[:100]}' is used by an "
                     "earlier line; each must be unique within the batch.", number, "custom_id")
    seen.add(cid)
    if obj.get("method") != "POST":
        return error("invalid_value", "method must be 'POST'.", number, "method")
    if obj.get("url") != endpoint:
        return error("mismatched_endpoint", f"The url '{str(obj.get('url'))[:100]}' does not "
                     f"match the batch's endpoint '{endpoint}'.", number, "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return error("invalid_value", "body must be a JSON object: the request.", number, "body")
    try:
        check_hostile(raw)
        if body.get("stream"):
            raise APIError(400, "stream is not available in a batch: its answers are whole.",
                           param="stream", code="invalid_value")
        parse_request(endpoint, body)
    except APIError as e:
        param = e.param if e.param is None or e.param.startswith("body") else f"body.{e.param}"
        return error(e.code or "invalid_request", e.message, number, param or "body")
    return Line(number, cid, body)
