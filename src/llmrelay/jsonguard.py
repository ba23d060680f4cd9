"""What a JSON body meets before anything trusts it, at the API server's door and again in the
worker: its nesting depth, counted on the bytes before a parser recurses (Python's `json` raises
RecursionError near 1,000 levels, orjson refuses past 1,024), and lone UTF-16 surrogates
(`"\\ud800"` is valid JSON, but no text encoding can write it, so a tokenizer fails on it).

Both checks cost next to nothing on ordinary bodies: the depth is only counted when the body
holds more brackets than the limit, and strings are only walked when the bytes hold a
surrogate escape (or are not UTF-8).
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any

# Arrays and objects nested deeper than this are refused (docs/reliability.md). Real requests
# stay far below it: a tool's JSON schema nested ten objects deep is about 25 levels of the body.
MAX_DEPTH = 128

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests arrays and objects more than `limit` deep (brackets inside
    strings do not count). Never parses, so never recurses."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    return max(accumulate(array("b", brackets.translate(_STEP))), default=0) > limit


def depth(value: Any) -> int:
    """How deep a parsed JSON value nests lists and dicts (a scalar: 0), without recursing."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d + 1)
        todo.extend((x, d + 1) for x in v)
    return deepest


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate(data: Any) -> str | None:
    """Where a parsed JSON value holds a string (or a key) with a lone UTF-16 surrogate, as a
    parameter path (`messages[0].content`, `""` for the value itself); None when none does."""
    todo: list[tuple[Any, str]] = [(data, "")]
    while todo:
        v, path = todo.pop()
        if isinstance(v, str):
            if not v.isascii() and not _encodable(v):
                return path
        elif isinstance(v, dict):
            for k, x in v.items():
                inner = f"{path}.{k}" if path else str(k)
                if not _encodable(str(k)):
                    return path or "body"
                todo.append((x, inner))
        elif isinstance(v, list):
            todo.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
    return None


def suspect(body: bytes) -> bool:
    """Whether the bytes may decode to a lone surrogate: a surrogate escape, or bytes that are
    not strict UTF-8 (Python's `json` reads encoded surrogates and UTF-16 as well)."""
    if _SURROGATE_ESCAPE.search(body):
        return True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def surrogate_in(body: bytes, data: Any = None) -> str | None:
    """`lone_surrogate` of a JSON body (parsed here unless `data` is given), checked only when
    the bytes are `suspect`; None for a body that does not parse."""
    if not suspect(body):
        return None
    if data is None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None
    where = lone_surrogate(data)
    return None if where is None else (where or "body")


SURROGATE_MESSAGE = ("holds a lone UTF-16 surrogate (such as \\ud800 without its pair), which "
                     "is not a Unicode character")
