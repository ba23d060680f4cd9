"""Tools, structured output and logit bias, as every front door hands them to the pipeline.

Each front door (chat completions; the Responses and Messages APIs) turns its own shapes into
these: `Tool` (a function with a JSON schema of its arguments), a tool choice (`none`, `auto`,
`required` or a tool's name), a response schema, and a logit bias. `Constraints` checks them
once (a schema that is not a JSON schema, a tool choice naming no tool, a tool result answering
no call: 400s naming the parameter), says which engine features a worker needs to honour them
(the API server refuses a request no worker of the model can honour, naming the parameter and
the model, and routes only to workers that can), and writes them into the worker params (our
`tools` extension: the worker puts the tools in the prompt and constrains the generation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from llmrelay.api.errors import APIError, bad_param
from llmrelay.api.table import Worker, WorkerTable
from llmrelay.jsonguard import depth
from llmrelay.protocol import EXT_IMAGES, EXT_TOOLS

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
MAX_SCHEMA_DEPTH = 64  # levels of objects and arrays in a schema (docs/reliability.md)
BIAS_RANGE = 100.0
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() also takes "²"
MAX_TOKEN_ID = 2**31 - 1  # (each engine refuses ids past its own vocabulary)


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON schema object, or a 400 naming `param` and what is wrong with it (also for one
    nested more than MAX_SCHEMA_DEPTH levels, which the validator and the grammars would
    recurse through)."""
    if not isinstance(schema, dict):
        raise bad_param(param, f"{param} must be a JSON schema object.")
    too_deep = bad_param(param, f"{param} nests more than {MAX_SCHEMA_DEPTH} levels of "
                         "objects and arrays, which this server does not accept.",
                         "nested_too_deep")
    if depth(schema) > MAX_SCHEMA_DEPTH:
        raise too_deep
    try:
        validator_for(schema).check_schema(schema)
    except RecursionError:  # (a $ref cycle or the like that the depth does not show)
        raise too_deep from None
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise bad_param(param, f"{param} is not a valid JSON schema: {e.message}"
                        + (f" (at {where})" if where else "") + ".") from None
    return schema


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None
    strict: bool | None = None

    def wire(self) -> dict[str, Any]:
        """OpenAI's chat shape, as workers and upstream servers take it."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        if self.strict is not None:
            fn["strict"] = self.strict
        return {"type": "function", "function": fn}


def tool(name: Any, parameters: Any, description: Any, strict: Any, param: str) -> Tool:
    """A tool from a front door's fields; `param` names it in errors (e.g. `tools[2]`)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_param(f"{param}.name", "A tool's name must be 1 to 64 letters, digits, "
                        f"underscores or dashes; got {str(name)[:80]!r}.")
    schema = {"type": "object", "properties": {}} if parameters is None else check_schema(
        parameters, f"{param}.parameters")
    return Tool(name, schema, description if isinstance(description, str) else None,
                strict if isinstance(strict, bool) else None)


@dataclass
class Constraints:
    """What a request asks the generation to follow (see the module docstring)."""

    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "auto"  # none, auto, required, or a tool's name (`named`)
    named: bool = False
    parallel: bool = True
    response_schema: dict[str, Any] | None = None
    response_json_object: bool = False
    response_name: str = "response"
    logit_bias: dict[str, float] = field(default_factory=dict)
    images: str | None = None  # the first image part's name, when the messages hold images

    def __post_init__(self) -> None:
        if len(self.tools) > MAX_TOOLS:
            raise bad_param("tools", f"At most {MAX_TOOLS} tools per request.")
        names = [t.name for t in self.tools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise bad_param("tools", f"Two tools are named '{dup}'.")

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def needs(self) -> dict[str, str]:
        """Engine features the request needs -> the parameter that asks for it."""
        out = {}
        if self.calls_tools:
            out["tools"] = "tools"
        if self.response_schema is not None or self.response_json_object:
            out["json_schema"] = "response_format"
        if self.logit_bias:
            out["logit_bias"] = "logit_bias"
        if self.images:
            out["vision"] = self.images
        return out

    def honoured_by(self, worker: Worker) -> bool:
        needs = self.needs()
        if not needs:
            return True
        features = worker.features
        return (features is not None and all(getattr(features, f, False) for f in needs)
                and (EXT_TOOLS in worker.extensions or set(needs) == {"vision"})
                and ("vision" not in needs or EXT_IMAGES in worker.extensions))

    def check_workers(self, table: WorkerTable, model: str) -> None:
        """400 naming the parameter and the model when no worker of it can honour this."""
        needs = self.needs()
        workers = table.serving(model)
        if not needs or not workers or any(self.honoured_by(w) for w in workers):
            return
        if self.images and not any(Constraints(images=self.images).honoured_by(w)
                                   for w in workers):
            raise APIError(400, f"The model '{model}' takes no images ({self.images} is an "
                           "image); send text only, or use a model that reads images.",
                           param=self.images, code="model_takes_no_images")
        feature, param = next(
            (f, p) for f, p in needs.items()
            if not any(w.features is not None and getattr(w.features, f, False)
                       and EXT_TOOLS in w.extensions for w in workers))
        fastchat = all(w.features is None for w in workers)
        why = (" (its workers are FastChat workers, which cannot constrain generation)"
               if fastchat else f" (its engine does not declare '{feature}')")
        raise APIError(400, f"The model '{model}' does not support '{param}'{why}.",
                       param=param, code="unsupported_parameter")

    def params(self) -> dict[str, Any]:
        """Our `tools` extension's fields for the worker params."""
        out: dict[str, Any] = {}
        if self.tools:
            out["tools"] = [t.wire() for t in self.tools]
            out["tool_choice"] = ({"type": "function", "function": {"name": self.tool_choice}}
                                  if self.named else self.tool_choice)
            out["parallel_tool_calls"] = self.parallel
        if self.response_schema is not None:
            out["response_format"] = {"type": "json_schema", "json_schema": {
                "name": self.response_name, "schema": self.response_schema}}
        elif self.response_json_object:
            out["response_format"] = {"type": "json_object"}
        if self.logit_bias:
            out["logit_bias"] = dict(self.logit_bias)
        return out


def choose(tools: list[Tool], choice: Any, param: str = "tool_choice") -> tuple[str, bool]:
    """(tool_choice, named) from `none`/`auto`/`required` or a tool's name; 400 for a choice
    without tools or naming no tool."""
    if choice is None:
        return ("auto" if tools else "none"), False
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise bad_param(param, f"tool_choice '{choice}' needs tools; give tools or drop "
                            "tool_choice.")
        return choice, False
    if not tools:
        raise bad_param(param, "tool_choice names a tool, but the request has no tools.")
    if not isinstance(choice, str) or choice not in {t.name for t in tools}:
        raise bad_param(param, f"tool_choice names the tool '{str(choice)[:80]}', which is not "
                        f"among the tools ({', '.join(t.name for t in tools)}).")
    return choice, True


def logit_bias(bias: Any, param: str = "logit_bias") -> dict[str, float]:
    """OpenAI's logit bias: token ids (as strings) -> -100..100."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise bad_param(param, "logit_bias must map token ids to numbers.")
    out = {}
    for k, v in bias.items():
        if not TOKEN_ID.fullmatch(str(k)) or int(k) > MAX_TOKEN_ID:
            raise bad_param(param, f"logit_bias keys must be token ids (0 to {MAX_TOKEN_ID}); "
                            f"got {str(k)[:40]!r}.")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > BIAS_RANGE:
            raise bad_param(param, f"logit_bias values must be numbers from -100 to 100; got "
                            f"{v!r} for token {k}.")
        out[str(int(k))] = float(v)
    return out


def check_tool_results(messages: list[dict[str, Any]], param: str = "messages") -> None:
    """Every tool result answers a call made earlier in the conversation."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            called.add(c["id"])
        if m.get("role") == "tool" and m.get("tool_call_id") not in called:
            raise bad_param(f"{param}[{i}].tool_call_id", f"{param}[{i}] is a tool result for "
                            f"'{str(m.get('tool_call_id'))[:80]}', which no earlier assistant "
                            "message called.")
