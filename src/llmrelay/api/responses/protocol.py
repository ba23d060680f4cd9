"""The Responses API's shapes: the request (validated with pydantic; tools, tool choice and
`text.format` checked into api/tools.py's `Constraints`) and the Response object with its output
items (dataclasses, written by `protocol.dumps`), with every field the `openai` SDK's types
require.

Parameters this server cannot honour are refused with a 400 naming them, never ignored:
built-in tools, `background`, `conversation`, `prompt`, `truncation: auto`, reasoning settings,
logprobs, `include` values. Parameters that only tune OpenAI's own service (`service_tier`,
prompt caching, `safety_identifier`) are accepted and have no effect. Unknown parameters are a
400, as OpenAI answers them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from llmrelay.api.errors import APIError, bad_param
from llmrelay.api.plan import ReasoningSettings, reasoning_object
from llmrelay.api.protocol import MaxTokens
from llmrelay.api.tools import Constraints, check_schema, choose, tool

# Accepted and without effect here: they tune OpenAI's own service.
IGNORED = {"service_tier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
           "safety_identifier"}
# Accepted only at their default (None or the value given): anything else is a 400.
REFUSED: dict[str, tuple[Any, str]] = {
    "background": (False, "background responses are not supported; send the request without "
                          "it (stream it, if it takes long)"),
    "truncation": ("disabled", "only truncation 'disabled' is supported: an input longer than "
                               "the model's context is a 400"),
    "top_logprobs": (0, "logprobs are not supported on /v1/responses yet; use "
                        "/v1/chat/completions with logprobs"),
    "max_tool_calls": (None, "max_tool_calls is not supported"),
    "conversation": (None, "conversations are not supported; use previous_response_id"),
    "prompt": (None, "prompt templates are not supported; send input and instructions"),
    "context_management": (None, "context_management is not supported"),
    "image": (None, "image settings are not supported: the models here read text only"),
    "moderation": (None, "moderation is not supported"),
    "access_programs": (None, "access_programs is not supported"),
}
MAX_METADATA = 16


def new_id(prefix: str) -> str:
    """An id as OpenAI writes them: `resp_`, `msg_`, `fc_` ... and 48 random hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


# ---- the request --------------------------------------------------------------------------------


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: str
    name: str | None = None
    description: str | None = None
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: we never obfuscate
    reasoning: dict[str, Any] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None

    def refuse_unsupported(self) -> None:
        """400 naming a parameter this server cannot honour (see the module docstring)."""
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key not in REFUSED:
                raise bad_param(key, f"Unknown parameter: '{key[:64]}'.", "unknown_parameter")
            default, why = REFUSED[key]
            if value is not None and value != default:
                raise bad_param(key, f"'{key}' {why}.", "unsupported_parameter")
        self.reasoning_settings()
        for i, value in enumerate(self.include or []):
            if value == "reasoning.encrypted_content":
                continue  # reasoning items carry their text itself; nothing is encrypted here
            raise bad_param(f"include[{i}]", f"include '{value[:80]}' is not supported: this "
                            "server has no logprobs or built-in tool results to include (send "
                            "include: [] or leave it out).", "unsupported_value")
        meta = self.metadata or {}
        if len(meta) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
            raise bad_param("metadata", f"metadata holds at most {MAX_METADATA} pairs, keys of "
                            "up to 64 characters and values of up to 512.")

    def reasoning_settings(self) -> ReasoningSettings | None:
        """`reasoning` (`effort`, `summary`; ours: `max_tokens`, a budget) checked: 400s naming
        the field."""
        if self.reasoning is None:
            return None
        summary = self.reasoning.get("summary", self.reasoning.get("generate_summary"))
        if summary not in (None, "auto", "concise", "detailed"):
            raise bad_param("reasoning.summary", "reasoning.summary must be auto, concise or "
                            "detailed.")
        return reasoning_object({k: v for k, v in self.reasoning.items()
                                 if k not in ("summary", "generate_summary")}, None, "reasoning")

    def echo_reasoning(self) -> Reasoning:
        """The Response's `reasoning`: the effort and summary asked for (null when not)."""
        r = self.reasoning or {}
        effort, summary = r.get("effort"), r.get("summary", r.get("generate_summary"))
        return Reasoning(effort if isinstance(effort, str) else None,
                         summary if isinstance(summary, str) else None)

    def tool_list(self) -> list[Any]:
        """The function tools, checked (a 400 naming the tool for any other kind)."""
        out = []
        for i, t in enumerate(self.tools or []):
            param = f"tools[{i}]"
            if not isinstance(t, dict):
                raise bad_param(param, f"{param} must be an object.")
            kind = t.get("type")
            if kind != "function":
                raise bad_param(f"{param}.type", f"Tool type '{str(kind)[:40]}' is not "
                                "supported; only function tools are (no built-in tools such as "
                                "web search or file search).", "unsupported_value")
            if "name" not in t and isinstance(t.get("function"), dict):
                raise bad_param(f"{param}.name", "The Responses API takes function tools flat: "
                                "{'type': 'function', 'name': ..., 'parameters': ...}, not "
                                "nested under 'function' as chat completions does.")
            out.append(tool(t.get("name"), t.get("parameters"), t.get("description"),
                            t.get("strict"), param))
        return out

    def constraints(self) -> Constraints:
        """The tools, tool choice and text format, checked (400s naming the parameter)."""
        tools = self.tool_list()
        choice: Any = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise bad_param("tool_choice", "tool_choice must be 'none', 'auto', 'required' "
                                "or {'type': 'function', 'name': ...}; tool choice type "
                                f"'{str(choice.get('type'))[:40]}' is not supported.",
                                "unsupported_value")
            choice = choice["name"]
        elif choice is not None and choice not in ("none", "auto", "required"):
            raise bad_param("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'name': ...}.")
        chosen, named = choose(tools, choice)
        out = Constraints(tools=tools, tool_choice=chosen, named=named,
                          parallel=self.parallel_tool_calls is not False)
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return out
        if fmt.type == "json_object":
            out.response_json_object = True
        elif fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise bad_param("text.format.schema", "text.format json_schema needs a "
                                "schema.")
            out.response_schema = check_schema(fmt.schema_, "text.format.schema")
            out.response_name = fmt.name or "response"
        else:
            raise bad_param("text.format.type", f"text.format type '{fmt.type[:40]}' is not "
                            "supported; use text, json_object or json_schema.",
                            "unsupported_value")
        return out

    def echo_text(self) -> dict[str, Any]:
        """`text` as the Response object repeats it."""
        out: dict[str, Any] = {"format": {"type": "text"}}
        if self.text is not None:
            if self.text.format is not None:
                out["format"] = self.text.format.model_dump(by_alias=True, exclude_none=True)
            if self.text.verbosity is not None:
                out["verbosity"] = self.text.verbosity
        return out

    def echo_tools(self, tools: list[Any]) -> list[dict[str, Any]]:
        """`tools` as the Response object repeats them (the schema always enforced: strict)."""
        return [{"type": "function", "name": t.name, "description": t.description,
                 "parameters": t.parameters, "strict": True} for t in tools]

    def echo_ignored(self, key: str) -> str | None:
        """A parameter of IGNORED as the Response object repeats it (None unless a string)."""
        value = (self.model_extra or {}).get(key)
        return value if isinstance(value, str) else None

    def echo_tool_choice(self) -> str | dict[str, Any]:
        if isinstance(self.tool_choice, dict):
            return {"type": "function", "name": self.tool_choice.get("name")}
        return self.tool_choice or "auto"


# ---- the Response object ------------------------------------------------------------------------
# Plain dataclasses, written by orjson as they are (see api/protocol.py).


@dataclass
class OutputText:
    text: str
    type: str = "output_text"
    annotations: list[Any] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)


@dataclass(kw_only=True)
class OutputMessage:
    id: str
    type: str = "message"
    role: str = "assistant"
    status: str = "completed"
    content: list[OutputText]


@dataclass(kw_only=True)
class FunctionCall:
    id: str
    type: str = "function_call"
    call_id: str
    name: str
    arguments: str
    status: str = "completed"


@dataclass
class ReasoningText:
    text: str
    type: str = "reasoning_text"


@dataclass(kw_only=True)
class ReasoningItem:
    """A reasoning model's reasoning, as its text (`content`); no summary is made, and nothing
    is encrypted (`encrypted_content` null)."""

    id: str
    type: str = "reasoning"
    summary: list[Any] = field(default_factory=list)
    content: list[ReasoningText] = field(default_factory=list)
    encrypted_content: None = None
    status: str = "completed"


OutputItem = OutputMessage | FunctionCall | ReasoningItem


@dataclass(frozen=True)
class InputTokensDetails:
    cached_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class OutputTokensDetails:
    reasoning_tokens: int = 0


NO_INPUT_DETAILS, NO_OUTPUT_DETAILS = InputTokensDetails(), OutputTokensDetails()


@dataclass
class ResponseUsage:
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = NO_INPUT_DETAILS
    output_tokens_details: OutputTokensDetails = NO_OUTPUT_DETAILS


@dataclass
class ResponseError:
    code: str  # OpenAI's list: server_error, rate_limit_exceeded, invalid_prompt, ...
    message: str


@dataclass(frozen=True)
class Reasoning:
    effort: str | None = None
    summary: str | None = None


NO_REASONING = Reasoning()


@dataclass(kw_only=True)
class Response:
    id: str
    object: str = "response"
    created_at: int
    status: str = "in_progress"
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: None = None
    model: str
    output: list[OutputItem] = field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: Reasoning = NO_REASONING
    service_tier: str = "default"
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int = 0
    top_p: float
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]
    completed_at: int | None = None
    safety_identifier: str | None = None  # echoed as given; nothing here uses them
    prompt_cache_key: str | None = None


def error_code(e: APIError) -> str:
    """The Response error code for an error met while generating (OpenAI's short list)."""
    if e.status == 429:
        return "rate_limit_exceeded"
    if e.status == 400:
        return "invalid_prompt"
    return "server_error"
