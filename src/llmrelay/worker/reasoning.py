"""Reasoning in generated text: the formats (vLLM's parser names), which one a model's chat
template asks for, and the streaming parser that splits a generation into reasoning and answer.

A reasoning model writes a reasoning block before its answer:

- `deepseek_r1`: the chat template opens `<think>` itself, after the assistant header
  (DeepSeek-R1 and its distills): the text is reasoning from its first token until `</think>`.
  A model that writes `<think>` again itself has it dropped.
- `qwen3`: the model writes `<think>` itself at the start of its answer (Qwen3, QwQ, Magistral,
  Phi-4-reasoning): reasoning until `</think>`; an answer that does not start with `<think>`
  is all answer (Qwen3 with thinking switched off).
- `gpt_oss`: the harmony channels: `<|channel|>analysis<|message|>` opens the reasoning,
  `<|end|>` closes it, and the answer is what follows `<|channel|>final<|message|>` (the
  header between is dropped). These markers are special tokens: for this format the engines
  write special tokens as text (`special_markers`).

`ReasoningParser` does not depend on how the text was cut into pieces: a marker split across
two pieces is held back until it is whole (as the tool-call parser does). What follows the
reasoning is the answer, its leading blank lines dropped (and the reasoning's own leading blank
space); the answer goes on to the tool-call
parser, so calls are parsed the same whether they follow reasoning or not.

A thinking budget (`Thinking`) is enforced by the engine: once the reasoning has taken
`budget` tokens and is still open, the engine writes `force_close` itself (as the model
would have), so a small budget always leaves room for an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NONE = "none"


@dataclass(frozen=True)
class ReasoningFormat:
    """How one family of models marks its reasoning."""

    name: str
    open: str  # what opens the reasoning block
    close: str  # what ends it
    starts_open: bool  # the chat template opened the block: the text starts inside it
    answer_marker: str = ""  # after `close`, text up to and including this is dropped
    force_close: str = ""  # what the engine writes when the budget is spent
    special_markers: bool = False  # the markers are special tokens: the engine writes them out

    @property
    def closing_text(self) -> str:
        return self.force_close or self.close


FORMATS = {
    "deepseek_r1": ReasoningFormat("deepseek_r1", "<think>", "</think>", starts_open=True,
                                   force_close="\n</think>\n\n"),
    "qwen3": ReasoningFormat("qwen3", "<think>", "</think>", starts_open=False,
                             force_close="\n</think>\n\n"),
    "gpt_oss": ReasoningFormat("gpt_oss", "<|channel|>analysis<|message|>", "<|end|>",
                               starts_open=False, answer_marker="<|channel|>final<|message|>",
                               force_close="<|end|><|start|>assistant<|channel|>final<|message|>",
                               special_markers=True),
}
NAMES = (*FORMATS, NONE)

# reasoning_effort -> thinking budget in tokens (documented in docs/reasoning.md); "none"
# switches thinking off where the template can (else a budget of 0 closes it at once).
EFFORT_BUDGETS = {"minimal": 128, "low": 512, "medium": 2048, "high": 8192}
EFFORTS = (*EFFORT_BUDGETS, "none")

# A template that ends its generation prompt inside an opened think block.
_OPENS_THINK = re.compile(r"add_generation_prompt[\s\S]*<think>\s*(\\n|\n)?\s*['\"]?\s*(%|\})")


def detect(template_source: str | None) -> str:
    """The format a chat template asks for (`none` when it shows no reasoning)."""
    src = template_source or ""
    if "<|channel|>" in src and "analysis" in src:
        return "gpt_oss"
    if "<think>" not in src:
        return NONE
    if _OPENS_THINK.search(src) and "enable_thinking" not in src:
        return "deepseek_r1"
    return "qwen3"


def choose(flag: str | None, template_source: str | None) -> ReasoningFormat | None:
    """The format for `--reasoning-parser` (`auto` or None: from the chat template)."""
    name = detect(template_source) if flag in (None, "", "auto") else flag
    if name == NONE:
        return None
    if name not in FORMATS:
        raise ValueError(f"unknown reasoning parser '{name}'; choose one of "
                         f"{', '.join(NAMES)} or auto")
    return FORMATS[name]


@dataclass(frozen=True)
class Thinking:
    """A request's reasoning settings as the engine needs them."""

    format: ReasoningFormat
    budget: int | None = None  # reasoning tokens before the engine closes the block


def _partial(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningParser:
    """Splits generated text, as it streams, into (reasoning, answer) pieces."""

    BEFORE, REASONING, HEADER, ANSWER = "before", "reasoning", "header", "answer"

    def __init__(self, fmt: ReasoningFormat) -> None:
        self.fmt = fmt
        self.state = self.BEFORE
        self._held = ""
        self._answer_started = False
        self._reasoning_started = False
        self.closed = False  # the reasoning block was closed

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far is (or may still be) reasoning."""
        return self.state == self.REASONING or (self.state == self.BEFORE
                                                and self.fmt.starts_open)

    def feed(self, text: str) -> tuple[str, str]:
        """Add generated text; returns (reasoning, answer) to send now."""
        buf = self._held + text
        self._held = ""
        reasoning = answer = ""
        while buf:
            if self.state == self.BEFORE:
                lead = buf.lstrip()
                if lead.startswith(self.fmt.open):
                    buf = lead[len(self.fmt.open):]
                    self.state = self.REASONING
                elif self.fmt.open.startswith(lead):
                    self._held = buf  # maybe the opening marker: wait for more
                    buf = ""
                else:
                    self.state = self.REASONING if self.fmt.starts_open else self.ANSWER
            elif self.state == self.REASONING:
                at = buf.find(self.fmt.close)
                if at >= 0:
                    reasoning += self._thought(buf[:at])
                    buf = buf[at + len(self.fmt.close):]
                    self.closed = True
                    self.state = self.HEADER if self.fmt.answer_marker else self.ANSWER
                else:
                    keep = _partial(buf, self.fmt.close)
                    reasoning += self._thought(buf[: len(buf) - keep])
                    self._held, buf = buf[len(buf) - keep:], ""
            elif self.state == self.HEADER:
                at = buf.find(self.fmt.answer_marker)
                if at >= 0:
                    buf = buf[at + len(self.fmt.answer_marker):]
                    self.state = self.ANSWER
                else:
                    keep = _partial(buf, self.fmt.answer_marker)
                    self._held, buf = buf[len(buf) - keep:], ""
            else:
                if not self._answer_started:
                    buf = buf.lstrip("\n") if self.closed else buf
                    if not buf:
                        break
                    self._answer_started = True
                answer += buf
                buf = ""
        return reasoning, answer

    def _thought(self, text: str) -> str:
        """Reasoning text to send: its leading blank space dropped (a block opened at once
        and closed holds only that: no reasoning at all)."""
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text

    def finish(self) -> tuple[str, str]:
        """The generation ended: release what was held back."""
        held, self._held = self._held, ""
        if not held:
            return "", ""
        if self.state == self.REASONING or (self.state == self.BEFORE and self.fmt.starts_open):
            return self._thought(held), ""
        if self.state == self.BEFORE:
            return "", held
        return "", ""
