"""What an engine must enforce on a generation, token by token, and where it comes from.

A `Constraint` describes the text a generation may produce in library-neutral terms: JSON
values of a schema, optionally between literal markers (tool calls), one or several, and
either from the start or only from the moment the model writes the opening marker (`lazy`:
`tool_choice: auto`, where the model may also answer in plain text). The engines that sample
themselves (llama.cpp, transformers) compile it with llguidance (engines/guidance.py, the same
grammar and refusals for both) and enforce it inside their batch, per sequence; compiled forms
are cached per distinct constraint (`key`, `CompiledCache`).

Builders:
- `for_tools`: a call of one of the tools (or exactly one call of the one named by
  `tool_choice`), its arguments valid against the tool's JSON schema; up to MAX_PARALLEL_CALLS
  when `parallel_tool_calls` (the worker ends the turn at the first repeated call).
- `for_response_format`: `json_object` (any JSON object) or `json_schema` (that schema).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from llmrelay.worker.toolcalls import CLOSE, OPEN

MAX_PARALLEL_CALLS = 8  # a small model could repeat calls until its length limit
T = TypeVar("T")


@dataclass(frozen=True)
class Constraint:
    """JSON value(s) of `schema`, each between `open` and `close` (when given), one or up to
    `max_blocks`; `lazy`: free text until the model writes `open`. `alternative`: instead of
    the blocks, one JSON value of this schema (tools and a response format together).
    `after`: free text until the model writes this (the end of a reasoning block,
    reasoning.py); the constraint holds from there on."""

    schema: dict[str, Any]
    open: str = ""
    close: str = ""
    max_blocks: int = 1
    lazy: bool = False
    alternative: dict[str, Any] | None = None
    after: str = ""
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", json.dumps(
                [self.schema, self.open, self.close, self.max_blocks, self.lazy, self.alternative,
                 self.after], sort_keys=True, separators=(",", ":")))


def call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a call of `tool` (OpenAI's function tool): its name, then its arguments."""
    fn = tool.get("function", tool)
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def for_tools(tools: list[dict[str, Any]], tool_choice: Any, parallel: bool,
              response_schema: dict[str, Any] | None = None) -> Constraint | None:
    """The constraint for a request with tools; None for `tool_choice: none`."""
    if not tools or tool_choice == "none":
        return None
    chosen = tools
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or tool_choice).get("name")
        chosen = [t for t in tools if (t.get("function") or t).get("name") == name]
    schemas = [call_schema(t) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    forced = tool_choice == "required" or isinstance(tool_choice, dict)
    # A named choice is exactly one call of that function (OpenAI: "call exactly one specific
    # function"), whatever parallel_tool_calls says.
    several = parallel and not isinstance(tool_choice, dict)
    return Constraint(schema=schema, open=OPEN + "\n", close="\n" + CLOSE,
                      max_blocks=MAX_PARALLEL_CALLS if several else 1,
                      lazy=not forced and response_schema is None,
                      alternative=None if forced else response_schema)


def response_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema an answer must follow for `response_format` (None: free text)."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        return spec.get("schema") or {"type": "object"}
    return None


def for_response_format(response_format: Any) -> Constraint | None:
    schema = response_schema(response_format)
    return None if schema is None else Constraint(schema=schema)


class CompiledCache(Generic[T]):
    """An engine's compiled constraints by `Constraint.key`, least recently used dropped past
    `size`; thread-safe. `compile` raises to refuse a constraint (nothing is cached then)."""

    def __init__(self, compile: Callable[[Constraint], T], size: int = 256) -> None:
        self.compile = compile
        self.size = size
        self.items: OrderedDict[str, T] = OrderedDict()
        self.lock = threading.Lock()
        self.compiled = 0  # how many constraints were compiled (the rest came from the cache)

    def get(self, c: Constraint) -> T:
        with self.lock:
            hit = self.items.get(c.key)
            if hit is not None:
                self.items.move_to_end(c.key)
                return hit
        value = self.compile(c)
        with self.lock:
            self.compiled += 1
            self.items[c.key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value
