"""Anthropic's Messages API: the request (validated with pydantic) and its translation into the
pipeline's terms (chat messages for the worker, `tools.Constraints`), and the responses
(dataclasses written by `protocol.dumps`): the Message, whole, and the streamed events.

Translation: `system` becomes a system message; a user message's `tool_result` blocks become
tool messages answering the call they name (a result with `is_error` reads "Error: ..."), its
text blocks a user message; an assistant message's `tool_use` blocks become its tool calls,
their `input` as JSON text. Tools are function tools (`input_schema` is the parameters'
schema); `tool_choice` `auto`/`any`/`tool`/`none` are chat's `auto`/`required`/a named
function/`none`, `disable_parallel_tool_use` is `parallel_tool_calls: false`;
`output_config.format` (a JSON schema) is the response schema; `thinking` is the reasoning
settings of a reasoning model (its reasoning comes back as `thinking` blocks, before the text),
and thinking blocks passed back are kept for the model's template. A user message's `image`
blocks (`base64` and `url` sources) become image references (api/images.py). What cannot be
served (documents, server tools, MCP servers) is a 400 naming it, never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmrelay.api.errors import bad_param
from llmrelay.api.images import content_of, image_ref
from llmrelay.api.plan import ReasoningSettings
from llmrelay.api.protocol import MAX_STOP, MaxTokens
from llmrelay.api.tools import Constraints, check_schema, choose, tool

# ---- the request --------------------------------------------------------------------------------


class Block(BaseModel):
    """A content block: text, tool_use (assistant), tool_result (user); others are refused."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[Block] | None = None
    is_error: bool | None = None
    thinking: str | None = None  # thinking (assistant, passed back)
    source: Any = None  # image (user): {"type": "base64", "media_type", "data"} or url


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[Block]


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Any = None
    description: str | None = None
    input_schema: Any = None
    type: str | None = None  # None or "custom": a client tool; anything else a server tool
    strict: bool | None = None


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


# Fields of Anthropic's API that ask for what this server does not do: refused, not ignored.
REFUSED_FIELDS = {
    "mcp_servers": "MCP servers are not supported; give the tools to the request",
    "container": "containers (code execution) are not supported",
}


class MessagesInput(BaseModel):
    """What `/v1/messages` and `/v1/messages/count_tokens` share: the model and the prompt."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        self.reasoning_settings()
        extra = self.model_extra or {}
        for key, why in REFUSED_FIELDS.items():
            if extra.get(key):
                raise bad_param(key, f"'{key}': {why}.", "unsupported_parameter")

    def reasoning_settings(self) -> ReasoningSettings | None:
        """`thinking` as the reasoning settings (a reasoning model's thinking, within
        `budget_tokens`, or switched off); 400s naming the field."""
        t = self.thinking
        if t is None:
            return None
        kind = t.get("type")
        if kind == "disabled":
            return ReasoningSettings(enabled=False)
        if kind not in ("enabled", "adaptive"):
            raise bad_param("thinking.type", "thinking.type must be 'enabled' (with "
                            "budget_tokens), 'adaptive' or 'disabled'.")
        budget = t.get("budget_tokens")
        if kind == "adaptive":
            return ReasoningSettings(budget_tokens=None if budget is None else int(budget))
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise bad_param("thinking.budget_tokens", "thinking.budget_tokens must be a whole "
                            "number of tokens.")
        max_tokens = getattr(self, "max_tokens", None)
        if max_tokens is not None and budget >= max_tokens:
            raise bad_param("thinking.budget_tokens", "max_tokens must be greater than "
                            f"thinking.budget_tokens ({budget}): the answer follows the "
                            "thinking within max_tokens.")
        return ReasoningSettings(budget_tokens=budget)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages for the worker (see the module docstring)."""
        out: list[dict[str, Any]] = []
        if self.system:
            out.append({"role": "system", "content": _text(self.system, "system")})
        called: set[str] = set()
        for i, m in enumerate(self.messages):
            param = f"messages[{i}]"
            if m.role not in ("user", "assistant", "system"):
                raise bad_param(f"{param}.role", f"Invalid role '{m.role[:40]}'; expected user "
                                "or assistant.")
            if isinstance(m.content, str) or m.role == "system":
                out.append({"role": m.role, "content": _text(m.content, f"{param}.content")})
            elif m.role == "assistant":
                out.append(_assistant(m.content, param, called))
            else:
                out.extend(_user(m.content, param, called))
        return out

    def constraints(self) -> Constraints:
        """The tools, tool choice and output format, checked (400s naming the parameter)."""
        tools = []
        for i, t in enumerate(self.tools or []):
            param = f"tools[{i}]"
            if t.type not in (None, "custom"):
                raise bad_param(f"{param}.type", f"Tool type '{t.type[:60]}' (a server tool) is "
                                "not supported; only client tools with an input_schema are.",
                                "unsupported_value")
            if t.input_schema is None:
                raise bad_param(f"{param}.input_schema", f"{param} has no input_schema.")
            schema = check_schema(t.input_schema, f"{param}.input_schema")
            tools.append(tool(t.name, schema, t.description, t.strict, param))
        choice, parallel = None, True
        c = self.tool_choice
        if c is not None:
            parallel = not c.disable_parallel_tool_use
            if c.type == "tool":
                if not c.name:
                    raise bad_param("tool_choice.name", "tool_choice of type 'tool' needs the "
                                    "tool's name.")
                choice = c.name
            elif c.type in CHOICES:
                choice = CHOICES[c.type]
                if c.type != "none" and not tools:
                    raise bad_param("tool_choice", f"tool_choice '{c.type}' needs tools.")
            else:
                raise bad_param("tool_choice.type", "tool_choice.type must be auto, any, tool "
                                f"or none; got '{c.type[:40]}'.")
        chosen, named = choose(tools, choice, "tool_choice")
        out = Constraints(tools=tools, tool_choice=chosen, named=named, parallel=parallel)
        fmt = (self.output_config or {}).get("format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
                raise bad_param("output_config.format", "output_config.format must be "
                                "{'type': 'json_schema', 'schema': {...}}.")
            out.response_schema = check_schema(fmt.get("schema"), "output_config.format.schema")
        return out


CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class MessagesRequest(MessagesInput):
    max_tokens: MaxTokens
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # 0: off
    metadata: dict[str, Any] | None = None
    stream: bool | None = False

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str]:
        if v and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return [s for s in v or [] if s]


class CountTokensRequest(MessagesInput):
    pass


def _text(content: str | list[Block], param: str) -> str:
    """Text blocks (or a string) as one text; any other block is refused."""
    if isinstance(content, str):
        return content
    texts = []
    for j, b in enumerate(content):
        if b.type != "text" or b.text is None:
            raise unsupported_block(b.type, f"{param}[{j}]")
        texts.append(b.text)
    return "\n".join(texts)


def unsupported_block(kind: str, param: str) -> Exception:
    return bad_param(param, f"Content block type '{kind[:40]}' is not supported here "
                     f"({param}); this server reads text, image (in user messages), thinking, "
                     "tool_use and tool_result blocks.",
                     "unsupported_value")


def _assistant(blocks: list[Block], param: str, called: set[str]) -> dict[str, Any]:
    texts, calls, thought = [], [], []
    for j, b in enumerate(blocks):
        where = f"{param}.content[{j}]"
        if b.type == "text" and b.text is not None:
            texts.append(b.text)
        elif b.type == "thinking":  # passed back: for the template to keep or drop
            thought.append(b.thinking or "")
        elif b.type == "redacted_thinking":
            continue
        elif b.type == "tool_use":
            if not b.id or not b.name:
                raise bad_param(where, f"{where} (tool_use) needs an id and a name.")
            if b.input is not None and not isinstance(b.input, dict):
                raise bad_param(f"{where}.input", f"{where}.input (tool_use) must be an object "
                                f"of the tool's arguments; got {type(b.input).__name__}.")
            called.add(b.id)
            args = b.input if b.input is not None else {}
            calls.append({"id": b.id, "type": "function", "function": {
                "name": b.name, "arguments": json.dumps(args, ensure_ascii=False)}})
        else:
            raise unsupported_block(b.type, where)
    msg: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        msg["tool_calls"] = calls
    if any(thought):
        msg["reasoning_content"] = "\n".join(thought)
    return msg


def _user(blocks: list[Block], param: str, called: set[str]) -> list[dict[str, Any]]:
    """A user turn's blocks in order: tool results as tool messages, runs of text and images as
    user messages."""
    out: list[dict[str, Any]] = []
    texts: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        where = f"{param}.content[{j}]"
        if b.type == "text" and b.text is not None:
            texts.append({"type": "text", "text": b.text})
            continue
        if b.type == "image":
            texts.append(_image(b, f"{where}.source"))
            continue
        if b.type != "tool_result":
            raise unsupported_block(b.type, where)
        if texts:
            out.append({"role": "user", "content": content_of(texts)})
            texts = []
        if b.tool_use_id not in called:
            raise bad_param(f"{where}.tool_use_id", f"{where} is a tool_result for "
                            f"'{str(b.tool_use_id)[:80]}', which no earlier assistant tool_use "
                            "block called.")
        result = _text(b.content, f"{where}.content") if b.content is not None else ""
        out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                    "content": f"Error: {result}" if b.is_error else result})
    if texts or not out:
        out.append({"role": "user", "content": content_of(texts)})
    return out


def _image(b: Block, param: str) -> dict[str, Any]:
    """An image block's source (`base64` with its media type, or `url`) as an image reference
    (a base64 source becomes a data URL)."""
    src = b.source if isinstance(b.source, dict) else {}
    kind = src.get("type")
    if kind == "url":
        return image_ref(src.get("url"), f"{param}.url")
    if kind == "base64":
        media, data = src.get("media_type"), src.get("data")
        if not isinstance(media, str) or not media.startswith("image/") or not isinstance(
                data, str):
            raise bad_param(param, f"{param}: a base64 source needs media_type image/... and "
                            "data.")
        return image_ref(f"data:{media};base64,{data}", f"{param}.data")
    raise bad_param(f"{param}.type", f"{param}.type must be base64 or url; got "
                    f"{str(kind)[:40]!r}.", "unsupported_value")


# ---- the responses ------------------------------------------------------------------------------
# Fields in Anthropic's order, `type` first (orjson writes a dataclass's fields in order). Every
# field Anthropic's types require is there (its SDKs' `x: T | null`), null or 0 where this server
# has nothing to report: no citations, server tools, containers, refusal details, service tiers;
# no prompt cache of Anthropic's kind (`cache_control` is accepted, nothing is billed as written
# to or read from a cache).


@dataclass(kw_only=True)
class TextBlock:
    type: str = "text"
    text: str
    citations: None = None


@dataclass(kw_only=True)
class ThinkingBlock:
    """A reasoning model's reasoning. Nothing is signed here: `signature` is empty (a thinking
    block passed back is read as it is)."""

    type: str = "thinking"
    thinking: str
    signature: str = ""


@dataclass(frozen=True)
class DirectCaller:
    """Who called a tool: the model itself (not a server tool)."""

    type: str = "direct"


DIRECT = DirectCaller()


@dataclass(kw_only=True)
class ToolUseBlock:
    type: str = "tool_use"
    id: str
    name: str
    input: dict[str, Any]
    caller: DirectCaller = DIRECT


@dataclass(frozen=True)
class CacheCreation:
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


NO_CACHE = CacheCreation()


@dataclass(kw_only=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation: CacheCreation = NO_CACHE
    server_tool_use: None = None
    service_tier: None = None
    inference_geo: None = None
    output_tokens_details: None = None


@dataclass(kw_only=True)
class Message:
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[ThinkingBlock | TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    stop_details: None = None
    usage: Usage
    container: None = None


@dataclass
class TokenCount:
    input_tokens: int


@dataclass(kw_only=True)
class MessageStart:
    type: str = "message_start"
    message: Message


@dataclass(kw_only=True)
class BlockStart:
    type: str = "content_block_start"
    index: int
    content_block: ThinkingBlock | TextBlock | ToolUseBlock


@dataclass(kw_only=True)
class TextDelta:
    type: str = "text_delta"
    text: str


@dataclass(kw_only=True)
class ThinkingDelta:
    type: str = "thinking_delta"
    thinking: str


@dataclass(kw_only=True)
class InputJSONDelta:
    type: str = "input_json_delta"
    partial_json: str


@dataclass(kw_only=True)
class BlockDelta:
    type: str = "content_block_delta"
    index: int
    delta: TextDelta | ThinkingDelta | InputJSONDelta


@dataclass(kw_only=True)
class BlockStop:
    type: str = "content_block_stop"
    index: int


@dataclass(kw_only=True)
class StopDelta:
    stop_reason: str
    stop_sequence: str | None
    stop_details: None = None
    container: None = None


@dataclass(kw_only=True)
class DeltaUsage:
    """message_delta's usage (cumulative): Anthropic's MessageDeltaUsage."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    server_tool_use: None = None
    output_tokens_details: None = None


@dataclass(kw_only=True)
class MessageDelta:
    """The end: why, and the usage so far (cumulative: it replaces message_start's)."""

    type: str = "message_delta"
    delta: StopDelta
    usage: DeltaUsage


@dataclass(frozen=True)
class Ping:
    type: str = "ping"


@dataclass(frozen=True)
class MessageStop:
    type: str = "message_stop"


Event = MessageStart | BlockStart | BlockDelta | BlockStop | MessageDelta | Ping | MessageStop
