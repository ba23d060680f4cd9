"""The typed delta stream: each worker frame parsed once, where it arrives (transport.py), into a
`Delta` that the pipeline, migration.py and every front door's renderer read.

A worker frame (protocol.Frame: JSON objects, the API server's own workers' delta frames or
FastChat's cumulative ones turned into deltas) carries new text, reasoning text, pieces of tool
calls, logprob entries, token ids (continuation), and on the last frame usage, the finish
reason and the stop string that ended it; an error frame has an error code, its message in
`text` and the refused parameter. A whole (non-streamed) answer is one `Delta` too, covering
the whole answer: its tool calls whole, its logprobs with each token's offset in the text
(migration.join, or /worker_generate's JSON answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmrelay.api.errors import APIError, from_worker
from llmrelay.protocol import LogprobEntry


@dataclass(slots=True)
class CallPiece:
    """A piece of a tool call: the first of a call has `id` and `name`, the others add to its
    `arguments`; in a whole answer, the whole call."""

    index: int = 0
    id: str = ""
    name: str = ""
    arguments: str = ""

    @classmethod
    def of(cls, wire: dict[str, Any]) -> CallPiece:
        return cls(int(wire.get("index") or 0), str(wire.get("id") or ""),
                   str(wire.get("name") or ""), str(wire.get("arguments") or ""))


@dataclass(slots=True)
class TokenUsage:
    """Tokens a generation used (a worker's `usage`); `reasoning_tokens` are counted within
    `completion_tokens`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, wire: dict[str, Any]) -> TokenUsage:
        return cls(int(wire.get("prompt_tokens") or 0), int(wire.get("completion_tokens") or 0),
                   int(wire.get("reasoning_tokens") or 0))


@dataclass(slots=True)
class Delta:
    """One worker frame (see the module docstring). `logprobs`: the frame's entries (None when
    it sent none); `text_offset`: each entry's start in the text, when the worker gave it (a
    whole answer's, after an echoed prompt)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[CallPiece] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    text_offset: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    usage: TokenUsage | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None
    error_code: int = 0
    param: str | None = None

    @classmethod
    def of(cls, frame: dict[str, Any]) -> Delta:
        """A worker's frame (a JSON object) as a Delta."""
        lp = frame.get("logprobs")
        usage = frame.get("usage")
        calls = frame.get("tool_calls")
        return cls(
            text=str(frame.get("text") or ""),
            reasoning=str(frame.get("reasoning") or ""),
            tool_calls=[CallPiece.of(c) for c in calls] if calls else [],
            logprobs=(lp.get("content") or []) if isinstance(lp, dict) and lp else None,
            text_offset=(lp.get("text_offset") or None) if isinstance(lp, dict) else None,
            token_ids=frame.get("token_ids") or [],
            usage=TokenUsage.of(usage) if usage else None,
            finish_reason=frame.get("finish_reason") or None,
            stop_sequence=frame.get("stop_sequence"),
            error_code=int(frame.get("error_code") or 0),
            param=frame.get("param"),
        )

    def error(self) -> APIError:
        """An error frame as the APIError the client gets (errors.from_worker)."""
        return from_worker(self.error_code, self.text, self.param)


def error_delta(message: str, code: int) -> Delta:
    """An error frame made by the API server (a broken answer from something in between)."""
    return Delta(text=message, error_code=int(code))
