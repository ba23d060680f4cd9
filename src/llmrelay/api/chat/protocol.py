"""OpenAI's chat completions: the request (validated with pydantic) and the responses
(dataclasses, written by `protocol.dumps`), whole and streamed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from llmrelay.api.errors import bad_param
from llmrelay.api.images import content_of, image_ref
from llmrelay.api.plan import EFFORTS, ReasoningSettings, reasoning_object
from llmrelay.api.protocol import MaxTokens, ResponseHead, SamplingRequest, UsageInfo
from llmrelay.api.tools import Constraints, check_schema, check_tool_results, choose, logit_bias, tool
from llmrelay.protocol import LogprobEntry

ROLES = {"system", "developer", "user", "assistant", "tool"}

# ---- the request --------------------------------------------------------------------------------


class TextPart(BaseModel):
    """A content part: text, or an image (`image_url`: `{"url", "detail"}`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: Any = None


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1)
    type: str = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Any = None
    description: str | None = None
    parameters: Any = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "function"
    function: FunctionDef


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # OpenRouter's and LiteLLM's object (`effort`, `max_tokens`, `enabled`): a budget in tokens
    reasoning: dict[str, Any] | None = None

    def reasoning_settings(self) -> ReasoningSettings | None:
        """`reasoning_effort` and `reasoning` checked (400s naming the parameter)."""
        effort = self.reasoning_effort
        if effort is not None and effort not in EFFORTS:
            raise bad_param("reasoning_effort", f"reasoning_effort must be one of "
                            f"{', '.join(EFFORTS)}; got {effort[:40]!r}.")
        extra = self.reasoning
        if extra is None:
            return None if effort is None else ReasoningSettings(effort != "none", effort)
        return reasoning_object(extra, effort, "reasoning")

    def constraints(self) -> Constraints:
        """The tools, response format and logit bias, checked (400s naming the parameter)."""
        out = tool_constraints(self.tools, self.tool_choice, self.parallel_tool_calls)
        out.logit_bias = logit_bias(self.logit_bias)
        fmt = self.response_format
        if fmt is not None:
            if fmt.type == "json_object":
                out.response_json_object = True
            elif fmt.type == "json_schema":
                spec = fmt.json_schema
                if spec is None or spec.schema_ is None:
                    raise bad_param("response_format.json_schema.schema", "response_format "
                                    "json_schema needs json_schema.schema.")
                out.response_schema = check_schema(spec.schema_,
                                                   "response_format.json_schema.schema")
                out.response_name = spec.name
            elif fmt.type != "text":
                raise bad_param("response_format.type", f"response_format type "
                                f"'{fmt.type[:40]}' is not supported; use text, json_object or "
                                "json_schema.", "unsupported_value")
        return out


def tool_constraints(tools_in: list[ChatTool] | None, choice: str | dict[str, Any] | None,
                     parallel: bool | None) -> Constraints:
    """OpenAI's chat `tools`, `tool_choice` and `parallel_tool_calls`, checked (400s naming the
    parameter)."""
    tools = []
    for i, t in enumerate(tools_in or []):
        if t.type != "function":
            raise bad_param(f"tools[{i}].type", f"Tool type '{t.type[:40]}' is not "
                            "supported; only function tools are.", "unsupported_value")
        f = t.function
        tools.append(tool(f.name, f.parameters, f.description, f.strict, f"tools[{i}].function"))
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(
            choice.get("function"), dict) else None
        if choice.get("type") != "function" or not name:
            raise bad_param("tool_choice", "tool_choice must be 'none', 'auto', 'required' "
                            "or {'type': 'function', 'function': {'name': ...}}.")
        choice = name
    elif choice is not None and choice not in ("none", "auto", "required"):
        raise bad_param("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                        "{'type': 'function', 'function': {'name': ...}}.")
    chosen, named = choose(tools, choice)
    return Constraints(tools=tools, tool_choice=chosen, named=named, parallel=parallel is not False)


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> plain dicts for the worker (`content` a string; an assistant's
    `tool_calls` with arguments as JSON text; a tool result's `tool_call_id`); 400 on what we
    can't serve."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if m.role == "function":
            raise bad_param(f"{param}.role", "Role 'function' (the deprecated function calling) "
                            "is not supported; send tool results as role 'tool'.",
                            "unsupported_value")
        if m.role not in ROLES:
            raise bad_param(f"{param}.role", f"Invalid role '{m.role[:50]}'; expected one of "
                            "system, developer, user, assistant, tool.")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise bad_param(f"{param}.content", f"{param}.content must be a string or a list of "
                            "text parts, not null.")
        content = _content(m.content, param)
        if not isinstance(content, str) and m.role != "user":
            raise bad_param(f"{param}.content", f"{param}: only user messages may hold images.",
                            "unsupported_value")
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": content}
        if m.role == "tool":
            if not m.tool_call_id:
                raise bad_param(f"{param}.tool_call_id", f"{param} is a tool result without "
                                "tool_call_id.")
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if m.role != "assistant":
                raise bad_param(f"{param}.tool_calls", "Only assistant messages carry "
                                "tool_calls.")
            msg["tool_calls"] = [_call(c, f"{param}.tool_calls[{j}]")
                                 for j, c in enumerate(m.tool_calls)]
        out.append(msg)
    check_tool_results(out)
    return out


def _content(content: str | list[TextPart] | None, param: str) -> str | list[dict[str, Any]]:
    """Text parts joined, or, with images, the parts in order (api/images.py)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        if part.type == "image_url":
            url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
            parts.append(image_ref(url, f"{where}.image_url"))
        elif part.type != "text" or part.text is None:
            raise bad_param(where, f"Content part type '{part.type[:40]}' is not supported; "
                            "only text and image_url parts are.", "unsupported_value")
        else:
            parts.append({"type": "text", "text": part.text})
    return content_of(parts)


def _call(c: ToolCallIn, param: str) -> dict[str, Any]:
    args = c.function.arguments
    return {"id": c.id, "type": "function", "function": {
        "name": c.function.name,
        "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


# ---- the responses ------------------------------------------------------------------------------


@dataclass
class ChatLogprobs:
    content: list[LogprobEntry]
    refusal: None = None  # required by OpenAI's schema (nullable): the models here never refuse


@dataclass
class FunctionCallOut:
    name: str
    arguments: str


@dataclass
class ToolCallOut:
    id: str
    function: FunctionCallOut
    type: str = "function"


@dataclass(kw_only=True)
class ChatMessageOut:
    role: str = "assistant"
    content: str | None
    refusal: None = None  # required by OpenAI's schema (nullable): no refusals here
    annotations: tuple[()] = ()  # no web search: never any URL citation


@dataclass(kw_only=True)
class ChatMessageWithCalls(ChatMessageOut):
    """An answer that called tools (`content` null when it wrote nothing else)."""

    tool_calls: list[ToolCallOut]


@dataclass(kw_only=True)
class ChatMessageReasoned(ChatMessageOut):
    """A reasoning model's answer: its reasoning apart, under both names clients read
    (vLLM's and DeepSeek's `reasoning_content`, OpenRouter's and vLLM's newer `reasoning`)."""

    reasoning_content: str
    reasoning: str


@dataclass(kw_only=True)
class ChatMessageReasonedWithCalls(ChatMessageReasoned):
    tool_calls: list[ToolCallOut]


@dataclass(kw_only=True)
class ChatChoice:
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


@dataclass(kw_only=True)
class ChatCompletion(ResponseHead):
    object: str = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


@dataclass(frozen=True)
class RoleDelta:
    """A choice's first chunk."""

    role: str = "assistant"
    content: str = ""


@dataclass
class ContentDelta:
    content: str


@dataclass
class ReasoningDelta:
    """A piece of a reasoning model's reasoning, under both names (see ChatMessageReasoned)."""

    reasoning_content: str
    reasoning: str


@dataclass
class ArgumentsDelta:
    arguments: str


@dataclass
class NamedArgumentsDelta:
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """A later piece of a call: more of its arguments (no `id`, `type` or name: OpenAI's
    schema types them as strings, so they are left out rather than null)."""

    index: int
    function: ArgumentsDelta


@dataclass
class FirstToolCallDelta:
    """A call's first piece: its `id`, `type` and name."""

    index: int
    id: str
    function: NamedArgumentsDelta
    type: str = "function"


@dataclass
class ToolCallsDelta:
    tool_calls: list[ToolCallDelta | FirstToolCallDelta]


@dataclass(frozen=True)
class EndDelta:
    """A choice's last chunk, with its finish reason: `{}`."""


@dataclass(kw_only=True)
class ChunkChoice:
    index: int
    delta: RoleDelta | ContentDelta | ReasoningDelta | ToolCallsDelta | EndDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


@dataclass(kw_only=True)
class ChatCompletionChunk(ResponseHead):
    object: str = "chat.completion.chunk"
    choices: list[ChunkChoice]


@dataclass(kw_only=True)
class ChatCompletionUsageChunk(ChatCompletionChunk):
    """The last chunk with `stream_options.include_usage`: no choices, the usage."""

    usage: UsageInfo
