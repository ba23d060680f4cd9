"""FastChat conversation templates: render chat messages into the `prompt` a FastChat worker wants.

A FastChat worker (one that announces none of our extensions) takes an already rendered
`prompt`. It describes how to render one at `/worker_get_conv_template` as a conversation:
`system_template`, `system_message`, two `roles`, few-shot `messages`, a separator style
(`sep_style`) with `sep`/`sep2`, and stop criteria. This module turns that description plus
OpenAI messages into the same prompt FastChat 0.2.36's own API server would build, and gives
the stop strings and stop token ids to send with it.

`sep_style` is an integer on the wire whose meaning follows FastChat 0.2.36's `SeparatorStyle`
enum (1 = ADD_COLON_SINGLE ... 19 = YUAN2). Later FastChat releases inserted styles (LLAMA3,
GEMMA, ...) and renumbered the rest, so a style may also be given by name (e.g. "LLAMA3").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# FastChat 0.2.36's SeparatorStyle, in enum order (auto() from 1).
STYLES_0_2_36 = [
    "ADD_COLON_SINGLE", "ADD_COLON_TWO", "ADD_COLON_SPACE_SINGLE", "NO_COLON_SINGLE",
    "NO_COLON_TWO", "ADD_NEW_LINE_SINGLE", "LLAMA2", "CHATGLM", "CHATML", "CHATINTERN", "DOLLY",
    "RWKV", "PHOENIX", "ROBIN", "FALCON_CHAT", "CHATGLM3", "DEEPSEEK_CHAT", "METAMATH", "YUAN2",
]
STYLE_NUMBER = {name: i + 1 for i, name in enumerate(STYLES_0_2_36)}


class ConvTemplateError(ValueError):
    """The worker's conversation template cannot be used (unknown style, malformed fields)."""


Turn = tuple[str, "str | None"]  # (role, message); None: the open turn the model completes


@dataclass
class Conversation:
    """FastChat's conversation description, as `/worker_get_conv_template` sends it."""

    name: str = ""
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    messages: list[Turn] = field(default_factory=list)
    offset: int = 0
    sep_style: str = "ADD_COLON_SINGLE"
    sep: str = "\n"
    sep2: str | None = None
    stop_str: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_wire(cls, conv: dict[str, Any]) -> Conversation:
        """Parse the `conv` object of `/worker_get_conv_template`; ConvTemplateError if unusable."""
        if not isinstance(conv, dict):
            raise ConvTemplateError("the conversation template is not an object")
        style = conv.get("sep_style")
        if isinstance(style, bool):
            style = None
        if isinstance(style, int):
            if not 1 <= style <= len(STYLES_0_2_36):
                raise ConvTemplateError(f"unknown sep_style {style} (FastChat 0.2.36 has 1 to "
                                        f"{len(STYLES_0_2_36)})")
            style_name = STYLES_0_2_36[style - 1]
        elif isinstance(style, str) and style.upper() in RENDERERS:
            style_name = style.upper()
        else:
            raise ConvTemplateError(f"unknown sep_style {style!r}")
        roles = conv.get("roles") or ("USER", "ASSISTANT")
        if not isinstance(roles, (list, tuple)) or len(roles) < 2 or not all(
                isinstance(r, str) for r in roles[:2]):
            raise ConvTemplateError("roles must be two strings")
        few_shot: list[Turn] = []
        for m in conv.get("messages") or []:
            if not isinstance(m, (list, tuple)) or len(m) < 2:
                raise ConvTemplateError("few-shot messages must be [role, text] pairs")
            few_shot.append((str(m[0]), None if m[1] is None else _text(m[1])))
        stop = conv.get("stop_str")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str)]
        ids = [t for t in (conv.get("stop_token_ids") or []) if isinstance(t, int)]
        return cls(
            name=str(conv.get("name") or ""),
            system_template=("{system_message}" if conv.get("system_template") is None
                             else str(conv.get("system_template"))),
            system_message=str(conv.get("system_message") or ""),
            roles=(roles[0], roles[1]),
            messages=few_shot,
            offset=int(conv.get("offset") or 0),
            sep_style=style_name,
            sep="" if conv.get("sep") is None else str(conv.get("sep")),
            sep2=None if conv.get("sep2") is None else str(conv.get("sep2")),
            stop_str=[s for s in stops if s],
            stop_token_ids=ids,
        )

    def system_prompt(self) -> str:
        # FastChat uses str.format; a template with other braces would fail there too.
        return self.system_template.replace("{system_message}", self.system_message)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """OpenAI messages -> prompt, as FastChat's API server builds it.

        A `system` message replaces the template's system message (the last one wins, wherever
        it stands); `user` and `assistant` turns follow the few-shot ones; an open assistant
        turn ends the prompt. Other roles are refused (FastChat answers them with a 500).
        """
        system = self.system_message
        turns: list[Turn] = list(self.messages)
        for m in messages:
            role = m.get("role")
            content = _text(m.get("content"))
            if role in ("system", "developer"):
                system = content
            elif role == "user":
                turns.append((self.roles[0], content))
            elif role == "assistant":
                turns.append((self.roles[1], content))
            else:
                raise ConvTemplateError(
                    f"this worker's conversation template ({self.name or 'FastChat'}) has no "
                    f"place for a '{role}' message; use system, user and assistant")
        turns.append((self.roles[1], None))
        conv = Conversation(self.name, self.system_template, system, self.roles, turns,
                            self.offset, self.sep_style, self.sep, self.sep2)
        return RENDERERS[self.sep_style](conv)

    def stops(self, requested: list[str] | None = None) -> list[str]:
        """The request's stop strings plus the template's (no duplicates, request's first)."""
        out: list[str] = []
        for s in [*(requested or []), *self.stop_str]:
            if s and s not in out:
                out.append(s)
        return out


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content list joined by \\n."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


# -- the separator styles: each a faithful rendering of FastChat's get_prompt branch ----------

def _add_colon_single(c: Conversation) -> str:
    out = c.system_prompt() + c.sep
    for role, msg in c.messages:
        out += f"{role}: {msg}{c.sep}" if msg else f"{role}:"
    return out


def _add_colon_two(c: Conversation) -> str:
    seps = [c.sep, c.sep2 or ""]
    out = c.system_prompt() + seps[0]
    for i, (role, msg) in enumerate(c.messages):
        out += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return out


def _add_colon_space_single(c: Conversation) -> str:
    out = c.system_prompt() + c.sep
    for role, msg in c.messages:
        out += f"{role}: {msg}{c.sep}" if msg else f"{role}: "
    return out


def _add_new_line_single(c: Conversation) -> str:
    sp = c.system_prompt()
    out = "" if sp == "" else sp + c.sep
    for role, msg in c.messages:
        out += f"{role}\n{msg}{c.sep}" if msg else f"{role}\n"
    return out


def _no_colon_single(c: Conversation) -> str:
    out = c.system_prompt()
    for role, msg in c.messages:
        out += f"{role}{msg}{c.sep}" if msg else role
    return out


def _no_colon_two(c: Conversation) -> str:
    seps = [c.sep, c.sep2 or ""]
    out = c.system_prompt()
    for i, (role, msg) in enumerate(c.messages):
        out += f"{role}{msg}{seps[i % 2]}" if msg else role
    return out


def _rwkv(c: Conversation) -> str:
    out = c.system_prompt()
    for role, msg in c.messages:
        if msg:
            out += f"{role}: " + msg.replace("\r\n", "\n").replace("\n\n", "\n") + "\n\n"
        else:
            out += f"{role}:"
    return out


def _llama2(c: Conversation) -> str:
    seps = [c.sep, c.sep2 or ""]
    out = c.system_prompt() if c.system_message else "[INST] "
    for i, (_, msg) in enumerate(c.messages):
        tag = c.roles[i % 2]
        if msg:
            out += msg + " " if i == 0 else f"{tag} {msg}{seps[i % 2]}"
        else:
            out += tag
    return out


def _llama3(c: Conversation) -> str:
    out = "<|begin_of_text|>" + (c.system_prompt() if c.system_message else "")
    for role, msg in c.messages:
        out += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        if msg:
            out += f"{msg.strip()}<|eot_id|>"
    return out


def _chatglm(c: Conversation) -> str:
    round_add = 1 if c.name == "chatglm2" else 0
    sp = c.system_prompt()
    out = sp + c.sep if sp else ""
    for i, (role, msg) in enumerate(c.messages):
        if i % 2 == 0:
            out += f"[Round {i // 2 + round_add}]{c.sep}"
        out += f"{role}：{msg}{c.sep}" if msg else f"{role}："
    return out


def _chatml(c: Conversation) -> str:
    sp = c.system_prompt()
    out = "" if sp == "" else sp + c.sep + "\n"
    for role, msg in c.messages:
        out += f"{role}\n{msg}{c.sep}\n" if msg else f"{role}\n"
    return out


def _chatglm3(c: Conversation) -> str:
    out = c.system_prompt() if c.system_message else ""
    for role, msg in c.messages:
        out += f"{role}\n{msg}" if msg else role
    return out


def _chatintern(c: Conversation) -> str:
    seps = [c.sep, c.sep2 or ""]
    out = c.system_prompt()
    for i, (role, msg) in enumerate(c.messages):
        if i % 2 == 0:
            out += "<s>"
        out += f"{role}:{msg}{seps[i % 2]}\n" if msg else f"{role}:"
    return out


def _dolly(c: Conversation) -> str:
    seps = [c.sep, c.sep2 or ""]
    out = c.system_prompt()
    for i, (role, msg) in enumerate(c.messages):
        if msg:
            out += f"{role}:\n{msg}{seps[i % 2]}" + ("\n\n" if i % 2 == 1 else "")
        else:
            out += f"{role}:\n"
    return out


def _phoenix(c: Conversation) -> str:
    out = c.system_prompt()
    for role, msg in c.messages:
        out += f"{role}: <s>{msg}</s>" if msg else f"{role}: <s>"
    return out


def _robin(c: Conversation) -> str:
    out = c.system_prompt() + c.sep
    for role, msg in c.messages:
        out += f"{role}:\n{msg}{c.sep}" if msg else f"{role}:\n"
    return out


def _falcon_chat(c: Conversation) -> str:
    out = c.system_prompt() + c.sep if c.system_message else ""
    for role, msg in c.messages:
        out += f"{role}: {msg}{c.sep}" if msg else f"{role}:"
    return out


def _metamath(c: Conversation) -> str:
    sp = c.system_prompt()
    out = "" if sp == "" else sp + c.sep
    for i, (role, msg) in enumerate(c.messages):
        start = ":\n" if i % 2 == 0 else ": " + (c.sep2 or "")
        end = c.sep if i % 2 == 0 else ""
        out += f"{role}{start}{msg}{end}" if msg else f"{role}{start}"
    return out


def _deepseek_chat(c: Conversation) -> str:
    seps = [c.sep, c.sep2 or ""]
    out = c.system_prompt()
    for i, (role, msg) in enumerate(c.messages):
        out += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return out


def _yuan2(c: Conversation) -> str:
    seps = [c.sep, c.sep2 or ""]
    out = c.system_prompt() + seps[1] if c.system_message else ""
    for _, msg in c.messages:
        if msg:
            out += msg + "<n>"
    # FastChat strips trailing characters of the set "<n>" (str.rstrip), not the suffix.
    return out.rstrip("<n>") + seps[0]


RENDERERS: dict[str, Callable[[Conversation], str]] = {
    "ADD_COLON_SINGLE": _add_colon_single,
    "ADD_COLON_TWO": _add_colon_two,
    "ADD_COLON_SPACE_SINGLE": _add_colon_space_single,
    "NO_COLON_SINGLE": _no_colon_single,
    "NO_COLON_TWO": _no_colon_two,
    "ADD_NEW_LINE_SINGLE": _add_new_line_single,
    "LLAMA2": _llama2,
    "LLAMA3": _llama3,  # newer FastChat releases; by name only
    "CHATGLM": _chatglm,
    "CHATML": _chatml,
    "CHATINTERN": _chatintern,
    "DOLLY": _dolly,
    "RWKV": _rwkv,
    "PHOENIX": _phoenix,
    "ROBIN": _robin,
    "FALCON_CHAT": _falcon_chat,
    "CHATGLM3": _chatglm3,
    "DEEPSEEK_CHAT": _deepseek_chat,
    "METAMATH": _metamath,
    "YUAN2": _yuan2,
}


# -- the other direction: describe a model's chat template as a FastChat conversation ------------

# Probe contents: control characters no template writes itself.
_S, _U1, _A1, _U2 = "\x10", "\x11", "\x12", "\x13"
PROBES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "A joke\nabout cats, please. "}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks"}],
]


@dataclass
class Description:
    """A FastChat conversation describing a chat template, and how faithful it is."""

    conv: dict[str, Any]
    exact: bool  # renders exactly as the model's template on every probe
    note: str  # why not, when not exact


def _wire(name: str, style: str, system_template: str, system_message: str, roles: tuple[str, str],
          sep: str, sep2: str | None, stops: list[str]) -> dict[str, Any]:
    return {
        "name": name, "system_template": system_template, "system_message": system_message,
        "roles": list(roles), "messages": [], "offset": 0, "sep_style": STYLE_NUMBER[style],
        "sep": sep, "sep2": sep2, "stop_str": stops[0] if len(stops) == 1 else (stops or None),
        "stop_token_ids": None,
    }


def _candidates(render: Callable[[list[dict[str, Any]]], str], name: str,
                stops: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    u = render([{"role": "user", "content": _U1}])
    if "<|im_start|>" in u:  # ChatML, with the default system prompt the template adds, if any
        default = ""
        if u.startswith("<|im_start|>system\n") and "<|im_end|>" in u:
            default = u[len("<|im_start|>system\n"):u.index("<|im_end|>")]
        out.append(_wire(name, "CHATML", "<|im_start|>system\n{system_message}", default,
                         ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>", None,
                         stops))
    # Any template of the shape  system_block + (role_prefix + content + sep)*  + open role_prefix
    # is FastChat's NO_COLON_SINGLE; read the pieces off probe renderings.
    ua = render([{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                 {"role": "user", "content": _U2}])
    if _U1 in u and all(c in ua for c in (_U1, _A1, _U2)):
        head_u = u.split(_U1, 1)[0]
        x = ua[ua.index(_U1) + 1:ua.index(_A1)]  # sep + assistant prefix
        y = ua[ua.index(_A1) + 1:ua.index(_U2)]  # sep + user prefix
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        # Where the separator ends and a role prefix begins does not change the rendering; the
        # common prefix of the two in-between pieces is taken as the separator.
        sep = x[:n]
        role_a, role_u = x[n:], y[n:]
        sys_default = head_u[: len(head_u) - len(role_u)] if head_u.endswith(role_u) else head_u
        # Until a place for the system message is found: before everything (closest, not exact).
        system_template, system_message = "{system_message}" + sys_default, ""
        s = render([{"role": "system", "content": _S}, {"role": "user", "content": _U1}])
        if _S in s and _U1 in s:
            head_s = s.split(_U1, 1)[0]
            if head_s.endswith(role_u):
                system_template = head_s[: len(head_s) - len(role_u)].replace(_S, "{system_message}")
                a, _, b = system_template.partition("{system_message}")
                if sys_default.startswith(a) and sys_default.endswith(b) and len(sys_default) >= len(a + b):
                    system_message = sys_default[len(a): len(sys_default) - len(b)]
        out.append(_wire(name, "NO_COLON_SINGLE", system_template, system_message,
                         (role_u, role_a), sep, None, stops))
    return out


def describe(render: Callable[[list[dict[str, Any]]], str], name: str,
             stops: list[str]) -> Description:
    """The FastChat conversation that renders like `render` (a model's chat template).

    Tries ChatML, then FastChat's NO_COLON_SINGLE with the pieces read off probe renderings, and
    checks each against the template on PROBES. When none is exact, the closest (most probes
    equal) is returned with `exact` false and a note saying where they differ.
    """
    best: tuple[int, dict[str, Any], str] | None = None
    try:
        candidates = _candidates(render, name, stops)
    except Exception:  # no chat template at all, or one that refuses the probes
        candidates = []
    for cand in candidates:
        conv = Conversation.from_wire(cand)
        ok, diff = 0, ""
        for probe in PROBES:
            try:
                want = render(probe)
            except Exception as e:  # a template that refuses a probe (e.g. no system role)
                diff = diff or f"the model's template refuses {[m['role'] for m in probe]}: {e}"
                continue
            got = conv.render(probe)
            if got == want:
                ok += 1
            elif not diff:
                diff = f"for roles {[m['role'] for m in probe]} the template gives {want!r}, " \
                       f"the conversation {got!r}"
        if ok == len(PROBES):
            return Description(cand, True, "")
        if best is None or ok > best[0]:
            best = (ok, cand, diff)
    if best is None:
        plain = _wire(name, "ADD_COLON_SINGLE", "{system_message}", "", ("USER", "ASSISTANT"),
                      "\n", None, stops)
        return Description(plain, False, "the template's turns could not be recognised; "
                           "described as plain 'USER: ... ASSISTANT:' turns")
    return Description(best[1], False, best[2])
