"""The Responses API's items, both ways.

In: `input` (a string, or items: messages with `input_text` / `output_text` parts, messages
without `type` as the OpenAI Agents SDK sends them, `function_call` echoed back,
`function_call_output`, and the `compaction` items of /v1/responses/compact) -> stored items in
OpenAI's item shape, each with an id (what `input_items` lists), and items -> the chat messages
the pipeline takes (an assistant's calls as `tool_calls`, a call's output as a `tool` message
answering it, a compaction as an assistant message with its summary; a user message's
`input_image` parts as image references, api/images.py). Any other item or part type (files,
built-in tool calls, references) is a 400 naming it.

Out: a whole answer's frame -> output items (a `message` with its `output_text`, then a
`function_call` per call).
"""

from __future__ import annotations

import json
from typing import Any

from llmrelay.api.errors import bad_param
from llmrelay.api.frames import Delta
from llmrelay.api.images import content_of, image_ref
from llmrelay.api.responses.compact import SUMMARY_PREFIX, decode
from llmrelay.api.responses.protocol import (
    FunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    new_id,
)
from llmrelay.protocol import new_call_id

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")


def input_items(value: str | list[Any], param: str = "input") -> list[dict[str, Any]]:
    """The request's `input` as stored items, ids given where the client gave none."""
    if isinstance(value, str):
        return [user_message(value)]
    return [_item(raw, f"{param}[{i}]") for i, raw in enumerate(value)]


def user_message(text: str) -> dict[str, Any]:
    return {"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


def _item(raw: Any, param: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise bad_param(param, f"{param} must be an item object.")
    kind = raw.get("type")
    if kind is None and "role" in raw:  # an "easy" message (the Agents SDK sends these)
        kind = "message"
    if kind == "message":
        return _message(raw, param)
    if kind == "function_call":
        return {"id": _str(raw, "id", param, required=False) or new_id("fc"),
                "type": "function_call",
                "call_id": _str(raw, "call_id", param),
                "name": _str(raw, "name", param),
                "arguments": _arguments(raw.get("arguments"), f"{param}.arguments"),
                "status": "completed"}
    if kind == "function_call_output":
        return {"id": _str(raw, "id", param, required=False) or new_id("fco"),
                "type": "function_call_output",
                "call_id": _str(raw, "call_id", param),
                "output": _output(raw.get("output"), f"{param}.output"),
                "status": "completed"}
    if kind == "reasoning":  # a reasoning model's, passed back: kept for the template
        return {"id": _str(raw, "id", param, required=False) or new_id("rs"),
                "type": "reasoning", "text": _reasoning_text(raw, param)}
    if kind == "compaction":  # what POST /v1/responses/compact answered (compact.py)
        decode(raw.get("encrypted_content"), f"{param}.encrypted_content")
        return {"id": _str(raw, "id", param, required=False) or new_id("cmp"),
                "type": "compaction", "encrypted_content": raw["encrypted_content"]}
    if kind is None:
        raise bad_param(f"{param}.type", f"{param} needs a 'type' (or a 'role', for a "
                        "message).")
    hint = (" Send the item itself, or continue with previous_response_id."
            if kind == "item_reference" else "")
    raise bad_param(f"{param}.type", f"Item type '{str(kind)[:60]}' is not supported; "
                    "supported: message, function_call, function_call_output, reasoning, "
                    "compaction." + hint,
                    "unsupported_value")


def _reasoning_text(raw: dict[str, Any], param: str) -> str:
    """A reasoning item's text: its `content` parts' (or, else, its summary's)."""
    for key in ("content", "summary"):
        parts = raw.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list) or not all(
                isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
            raise bad_param(f"{param}.{key}", f"{param}.{key} must be a list of text parts.")
        if parts:
            return "\n".join(p["text"] for p in parts)
    return ""


def _str(raw: dict[str, Any], key: str, param: str, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise bad_param(f"{param}.{key}", f"{param}.{key} must be a non-empty string.")
    return value


def _arguments(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    raise bad_param(param, f"{param} must be a JSON string.")


def _message(raw: dict[str, Any], param: str) -> dict[str, Any]:
    role = raw.get("role")
    if role not in ROLES:
        raise bad_param(f"{param}.role", f"Invalid role '{str(role)[:40]}'; expected one of "
                        f"{', '.join(ROLES)}.")
    part_type = "output_text" if role == "assistant" else "input_text"
    content = raw.get("content")
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": part_type, "text": content}]
    elif isinstance(content, list):
        parts = [_image_part(p, f"{param}.content[{j}]") if role == "user" and isinstance(
            p, dict) and p.get("type") == "input_image" else
            {"type": part_type, "text": _text_part(p, f"{param}.content[{j}]")}
            for j, p in enumerate(content)]
    else:
        raise bad_param(f"{param}.content", f"{param}.content must be a string or a list of "
                        "text parts.")
    if role == "assistant":
        for p in parts:
            p.update(annotations=[], logprobs=[])
    return {"id": _str(raw, "id", param, required=False) or new_id("msg"), "type": "message",
            "role": role, "status": "completed", "content": parts}


def _text_part(part: Any, param: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
        raise bad_param(f"{param}.type", f"Content part type '{str(kind)[:40]}' is not "
                        "supported; only input_text, output_text and (in user messages) "
                        "input_image parts are.", "unsupported_value")
    return str(part["text"])


def _image_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    """An `input_image` part as stored (its URL or data URL; a file_id is refused)."""
    if part.get("file_id") is not None and part.get("image_url") is None:
        raise bad_param(f"{param}.file_id", f"{param}: images by file_id are not supported; "
                        "send image_url (a URL or a data URL).", "unsupported_value")
    image_ref(part.get("image_url"), f"{param}.image_url")  # a 400 when it is no URL
    out = {"type": "input_image", "image_url": part["image_url"]}
    if isinstance(part.get("detail"), str):
        out["detail"] = part["detail"]
    return out


def _output(value: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [{"type": "input_text", "text": _text_part(p, f"{param}[{j}]")}
                for j, p in enumerate(value)]
    raise bad_param(param, f"{param} must be a string or a list of text parts.")


def _output_text(value: str | list[dict[str, Any]]) -> str:
    return value if isinstance(value, str) else "\n".join(p["text"] for p in value)


# ---- items -> chat messages ---------------------------------------------------------------------


def to_messages(instructions: str | None, items: list[dict[str, Any]], first_new: int = 0,
                param: str = "input") -> list[dict[str, Any]]:
    """The chat messages for stored items (a conversation's earlier items, then the request's
    own from `first_new` on), after the instructions as a system message. A call's output must
    answer a call made before it: a 400 naming the request's item otherwise."""
    out: list[dict[str, Any]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    called: set[str] = set()

    def where(i: int) -> str:  # a request's item, or one of the conversation before it
        return f"{param}[{i - first_new}]" if i >= first_new else "previous_response_id"

    thought = ""  # a reasoning item's text, for the assistant turn it came before
    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "reasoning":  # passed back ("text"), or a stored answer's ("content")
            thought = item.get("text") or "".join(p.get("text", "") for p in
                                                  item.get("content") or [])
            continue
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": content_of([
                image_ref(p["image_url"], f"{where(i)}.content[{j}].image_url")
                if p["type"] == "input_image" else {"type": "text", "text": p["text"]}
                for j, p in enumerate(item["content"])])})
            if role == "assistant" and thought:  # the template keeps it (reasoning_content)
                out[-1]["reasoning_content"] = thought  # or drops it, as it wants
            thought = ""
        elif kind == "function_call":
            called.add(item["call_id"])
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if item["call_id"] not in called:
                where = f"{param}[{i - first_new}]" if i >= first_new else "the conversation"
                raise bad_param(f"{where}.call_id", f"{where} is the output of call "
                                f"'{item['call_id'][:80]}', which no earlier function_call "
                                "made.")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _output_text(item["output"])})
        elif kind == "compaction":  # the summary of what it replaced, in the assistant's voice
            out.append({"role": "assistant", "content": SUMMARY_PREFIX + decode(
                item["encrypted_content"], f"{param}[{i - first_new}].encrypted_content")})
    return out


# ---- a whole answer -> output items --------------------------------------------------------------


def output_items(final: Delta, incomplete: bool = False) -> list[OutputItem]:
    """A whole answer's output items: its text as a message (an empty one when it said nothing
    and called nothing), then its calls. `incomplete`: cut by the length limit; the last item
    is then marked incomplete."""
    out: list[OutputItem] = []
    if final.reasoning:
        out.append(ReasoningItem(id=new_id("rs"), content=[ReasoningText(final.reasoning)]))
    text = final.text
    calls = final.tool_calls
    if text or not calls:
        out.append(OutputMessage(id=new_id("msg"), content=[OutputText(text)]))
    for c in calls:
        out.append(FunctionCall(id=new_id("fc"), call_id=c.id or new_call_id(),
                                name=c.name, arguments=c.arguments))
    if incomplete and out:
        out[-1].status = "incomplete"
    return out
