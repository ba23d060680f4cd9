"""The checks every JSON body meets at the door, before FastAPI parses it (jsonguard.py): arrays
and objects nested deeper than `MAX_DEPTH`, and text holding a lone UTF-16 surrogate, are 400s
naming the parameter, in the door's error shape (the routes' exception handlers render them).

`CheckedRoute` is the app's route class, so every route that takes a body gets the checks.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from llmrelay.api.errors import bad_param
from llmrelay.jsonguard import MAX_DEPTH, SURROGATE_MESSAGE, surrogate_in, too_deep

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def check(body: bytes) -> None:
    """A 400 for a body nested too deeply or holding a lone surrogate; nothing otherwise."""
    if too_deep(body):
        raise bad_param("body", f"The request body nests arrays and objects more than "
                        f"{MAX_DEPTH} levels deep, which this server does not accept.",
                        "nested_too_deep")
    where = surrogate_in(body)
    if where is not None:
        raise bad_param(where, f"Invalid value for '{where}': the text {SURROGATE_MESSAGE}.")


class CheckedRoute(APIRoute):
    """A route whose request body is `check`ed before FastAPI reads it as JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in BODY_METHODS:
                check(await request.body())  # kept by the request: FastAPI reads it from there
            return await handler(request)

        return checked
