"""OpenAI-shaped errors: `{"error": {message, type, param, code}}` with the right HTTP status.

Every failure the API server can meet ends here: validation, unknown model, auth, no worker,
worker errors (FastChat error codes mapped to statuses), and anything unexpected (a generic 500
with no traceback; the traceback goes to the log). A front door with an error shape of its own
(Anthropic's Messages API) gives `install` a `Shape` for its paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmrelay.protocol import ErrorCode, error_body

log = logging.getLogger("llmrelay.api")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        overloaded: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.overloaded = overloaded  # the model's workers are full (not the caller's limit)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_param(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_worker(error_code: int, text: str, param: Any = None) -> APIError:
    """A worker's FastChat error code -> an OpenAI error with the matching status; `param`: the
    field the worker named in its error frame (ours), if any."""
    if error_code == ErrorCode.CONTEXT_OVERFLOW:
        return APIError(400, text, param="messages", code="context_length_exceeded")
    if error_code in (ErrorCode.VALIDATION_TYPE_ERROR, ErrorCode.PARAM_OUT_OF_RANGE):
        return APIError(400, text, param=param if isinstance(param, str) else None,
                        code="invalid_value")
    if error_code == ErrorCode.INVALID_MODEL:
        return APIError(404, text, param="model", code="model_not_found")
    if error_code in (ErrorCode.RATE_LIMIT, ErrorCode.ENGINE_OVERLOADED):
        return APIError(429, text, type="rate_limit_exceeded", code="rate_limit_exceeded",
                        headers={"Retry-After": "1"}, overloaded=True)
    return APIError(500, f"the model worker failed: {text}", type="server_error")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Drop pydantic's union-branch markers such as "str" or "list[str]".
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int")]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def from_validation(errors: Sequence[Any]) -> APIError:
    """The 400 for pydantic's (or FastAPI's) validation errors: the first one, naming its
    parameter (also used for the request lines of a batch, api/batch/)."""
    first = errors[0] if errors else {}
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return bad_param("body", "The request body is not valid JSON.", None)
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {msg}." if param else f"{msg}."
    return APIError(400, message, param=param,
                    code="invalid_value" if first.get("type") != "missing" else None)


# An error in a front door's own shape (e.g. Anthropic's), for the paths it serves.
Shape = Callable[[APIError], JSONResponse]


def install(app: FastAPI, shapes: dict[str, Shape] | None = None) -> None:
    """The error handlers: OpenAI's shape, except on the paths under a prefix of `shapes`
    (the prefix itself, or below it), which get that shape."""
    shaped = dict(shapes or {})

    def render(request: Request, e: APIError) -> JSONResponse:
        if shaped:
            path = request.url.path
            for prefix, shape in shaped.items():
                if path == prefix or path.startswith(prefix + "/"):
                    return shape(e)
        return e.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return render(request, e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return render(request, from_validation(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"Unknown path {request.url.path}."
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(e.detail)
        err_type = "invalid_request_error" if e.status_code < 500 else "server_error"
        return render(request, APIError(e.status_code, message, type=err_type))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return render(request, APIError(500, "The server had an error while processing your "
                                        "request.", type="server_error"))
