"""Tool calls in generated text: the streaming parser, and the generic tool prompt.

Models write a tool call as a JSON object between markers, the format Hermes, Qwen and SmolLM3
were trained on and the one our generic prompt asks for:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`ToolCallParser` splits a generation's text, as it streams, into content and tool-call deltas in
OpenAI's shape: the first delta of a call carries its index, id and name (never an empty name),
later ones pieces of its `arguments` JSON text. The result does not depend on how the text was
cut into pieces: streamed arguments joined equal the non-streamed ones (the unit suite cuts
recorded outputs at every position). Constrained generation (constraints.py) writes the name
before the arguments, which lets arguments stream as they come; a call written another way
(an unconstrained model) is parsed whole at its closing marker.

With `hold_repeats` (parallel calls allowed), every call after the first is held until it is
whole; one identical to a call already made in the turn (same name, same arguments as JSON) is
dropped and `repeated` is set, so that the generation can be ended there: repeating a call is
what a small model falls into, and its repetitions would run until the length limit. A call
after the first that the length limit cuts short is dropped too (its arguments would not
parse). What is held back at the end that can only be the start of a further call's marker
(`"\n<tool"` cut by the length limit) is dropped once a call was made, or when a call is
`forced`, never given as text.

`generic_messages` is the prompt for models whose chat template knows no tools: the tool list
and the call format in a system message, earlier calls and results written as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llmrelay.protocol import new_call_id

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"

_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass
class ToolCallDelta:
    """A piece of one tool call: the first has `id` and `name`, later ones `arguments` text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["name"] = self.name
        out["arguments"] = self.arguments
        return out


class _Call:
    """The call being read: its text after the opening marker, and how far it was read."""

    def __init__(self) -> None:
        self.text = ""
        self.name_end = -1  # just past the name's closing quote (-1: not read yet)
        self.args_start = -1  # where the arguments value starts
        self.scanned = 0  # arguments characters read (and sent)
        self.depth = 0  # nesting of the arguments value
        self.in_string = False
        self.escape = False
        self.args_end = -1  # just past the arguments value


class ToolCallParser:
    """Streams content and tool calls out of generated text (see the module docstring)."""

    def __init__(self, hold_repeats: bool = False, forced: bool = False) -> None:
        self.calls = 0  # calls started (and not dropped)
        self.repeated = False  # a call repeated one made before: the turn should end
        self.hold_repeats = hold_repeats
        self.forced = forced  # a call is forced: nothing but calls is ever text
        self._held = ""  # content not released yet: the start of a marker, or only spaces
        self._call: _Call | None = None
        self._deltas: list[ToolCallDelta] = []
        self._holding: list[ToolCallDelta] | None = None  # the current call's, until whole
        self._made: set[tuple[str, str]] = set()  # (name, arguments) of the whole calls
        self._name = ""  # the current call's name and arguments text
        self._arguments = ""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add generated text; returns (content to send, tool-call deltas to send)."""
        content = ""
        while text:
            read = self._read_call if self._call is not None else self._read_text
            out, text = read(text)
            content += out
        return content, self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The generation ended: release what was held back. A call cut short (the length
        limit) keeps what was sent, or is dropped if its name never came; a block that is no
        call is given back as text."""
        content = ""
        call, self._call = self._call, None
        if call is not None and call.name_end < 0:
            parsed = _whole(call.text)
            if parsed is None:
                # Cut short before its name (the length limit): dropped; not a call: text.
                if call.text.strip() and not call.text.lstrip().startswith("{"):
                    content = OPEN + call.text
            else:
                self._start(parsed[0])
                self._args(parsed[1])
                self._ended()
        elif call is not None:
            if call.args_end >= 0:
                self._ended()
            elif self._holding is not None:  # a later call cut short: its arguments won't parse
                self._holding = None
                self.calls -= 1
        held, self._held = self._held, ""
        marker = (self.calls or self.forced) and _partial_marker(held.rstrip())
        if (held.strip() and not marker) or (held and not self.calls and not self.forced):
            content += held
        return content, self._take()

    def _take(self) -> list[ToolCallDelta]:
        deltas, self._deltas = self._deltas, []
        return deltas

    def _read_text(self, text: str) -> tuple[str, str]:
        """Content up to an opening marker; returns (content to send, text after the marker).
        Spaces and newlines at the end of content are held until more words come: right
        before a call (or after the last one) they are not content."""
        buf = self._held + text
        at = buf.find(OPEN)
        if at >= 0:
            self._held = ""
            self._call = _Call()
            return buf[:at].rstrip(), buf[at + len(OPEN):]
        out = buf[: len(buf) - _partial_marker(buf)].rstrip()
        self._held = buf[len(out):]
        return out, ""

    def _read_call(self, text: str) -> tuple[str, str]:
        """Read call text; returns (content, what follows the call's closing marker): content
        only when the block turned out to be no call."""
        call = self._call
        assert call is not None
        call.text += text
        if call.name_end < 0:
            m = _NAME.match(call.text)
            if m:
                call.name_end = m.end()
                self._start(json.loads(f'"{m.group(1)}"'))
        if call.name_end >= 0 and call.args_start < 0:
            m = _ARGS.match(call.text, call.name_end)
            if m:
                call.args_start = m.end()
        if call.args_start >= 0 and call.args_end < 0:
            self._scan_args(call)
        if call.args_end >= 0:
            end = call.text.find(CLOSE, call.args_end)
        elif call.args_start < 0:  # the name or the arguments never came in that order
            end = call.text.find(CLOSE)
        else:
            return "", ""  # inside the arguments: a marker there is text of theirs
        if end < 0:
            return "", ""
        self._call = None
        rest = call.text[end + len(CLOSE):]
        if call.args_start < 0:
            parsed = _whole(call.text[:end])
            if parsed is None and call.name_end < 0:
                return OPEN + call.text[: end + len(CLOSE)], rest  # not a call: it was text
            if parsed is not None:
                if call.name_end < 0:
                    self._start(parsed[0])
                self._args(parsed[1])
        self._ended()
        return "", rest

    def _scan_args(self, call: _Call) -> None:
        """Send the arguments text read so far, up to the end of its JSON value."""
        s = call.text
        begin = i = call.args_start + call.scanned
        while i < len(s):
            c = s[i]
            if call.in_string:
                if call.escape:
                    call.escape = False
                elif c == "\\":
                    call.escape = True
                elif c == '"':
                    call.in_string = False
                    if call.depth == 0:
                        call.args_end = i + 1
                i += 1
            elif c == '"':
                call.in_string = True
                i += 1
            elif c in "{[":
                call.depth += 1
                i += 1
            elif c in "}]" and call.depth > 0:
                call.depth -= 1
                i += 1
                if call.depth == 0:
                    call.args_end = i
            elif call.depth == 0 and c in ",}] \n\r\t":
                call.args_end = i  # a bare value (a number, true, null) has ended
            else:
                i += 1
            if call.args_end >= 0:
                break
        self._args(s[begin:i])
        call.scanned += i - begin

    def _start(self, name: str) -> None:
        self._name, self._arguments = name, ""
        if self.hold_repeats and self.calls > 0:
            self._holding = []
        self._out().append(ToolCallDelta(self.calls, new_call_id(), name))
        self.calls += 1

    def _args(self, text: str) -> None:
        if not text:
            return
        self._arguments += text
        index = self.calls - 1
        out = self._out()
        if out and out[-1].index == index:
            out[-1].arguments += text
        else:
            out.append(ToolCallDelta(index, arguments=text))

    def _out(self) -> list[ToolCallDelta]:
        return self._holding if self._holding is not None else self._deltas

    def _ended(self) -> None:
        """The current call is whole: remember it; a held one is sent, or dropped as a repeat."""
        if not self._name:
            return
        made = (self._name, _canonical(self._arguments))
        self._name = ""
        holding, self._holding = self._holding, None
        if made in self._made and holding is not None:
            self.calls -= 1
            self.repeated = True
            return
        self._made.add(made)
        if holding:
            self._deltas += holding


def _partial_marker(text: str) -> int:
    """How many characters at the end of `text` could begin the opening marker."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


def _canonical(arguments: str) -> str:
    """Arguments JSON text in one spelling (keys sorted, no spaces), for comparing calls."""
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return arguments.strip()


def _whole(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a whole call block, or None when it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


# ---- the prompt --------------------------------------------------------------------------------


def speaks_tools(template_source: str) -> bool:
    """Whether a chat template renders `tools` itself in the `<tool_call>` format."""
    return OPEN in template_source and re.search(r"\btools\b", template_source) is not None


def tool_prompt(tools: list[dict[str, Any]], tool_choice: Any, parallel: bool) -> str:
    """The generic tool prompt: what the functions are and how to call them."""
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    text = ("You can call functions to help with the user's request. Each function is "
            "described by a JSON object with its name, what it does and a JSON schema of its "
            f"arguments:\n<tools>\n{chr(10).join(lines)}\n</tools>\n"
            f"To call a function, write a JSON object with its name and arguments between {OPEN} "
            f'and {CLOSE}, like this:\n{OPEN}\n{{"name": "function_name", "arguments": '
            f'{{"argument": "value"}}}}\n{CLOSE}\nThe results come back to you between '
            f"{RESPONSE_OPEN} and {RESPONSE_CLOSE}.")
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or tool_choice).get("name")
        text += f" Call the function {name} now."
    elif tool_choice == "required":
        text += " Call a function now."
    else:
        text += " If no function is needed, answer the user directly."
    if parallel and not isinstance(tool_choice, dict):
        text += " You may call several functions, each in its own block."
    return text


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return f"{OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def generic_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     tool_choice: Any = "auto", parallel: bool = True) -> list[dict[str, Any]]:
    """Messages for a chat template that knows no tools: the tool prompt in the system message
    (appended to the first one, or a new one), earlier calls written as `<tool_call>` blocks in
    the assistant's turn, and tool results as a user turn of `<tool_response>` blocks."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "tool":
            block = f"{RESPONSE_OPEN}\n{m.get('content') or ''}\n{RESPONSE_CLOSE}"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m.get("content") else []
            parts += [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
            continue
        out.append({"role": role, "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_results", None)
    if tools and tool_choice != "none":
        prompt = tool_prompt(tools, tool_choice, parallel)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template that renders tools itself (Hugging Face's convention: a
    call's arguments as an object, not a JSON string)."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", c))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                calls.append({**c, "function": fn})
            m = {**m, "content": m.get("content") or "", "tool_calls": calls}
        out.append(m)
    return out
