"""One generation as a call to the upstream through the `openai` SDK, and what its answers say.

Chat requests (the worker received `messages`) go to the upstream's chat endpoint, prompts and
token ids to its completions endpoint; tools, tool_choice and response_format go as they are
(the upstream enforces them), and its tool calls come back as our deltas. OpenAI's own
parameters are the SDK's arguments; those
that are not OpenAI's but that vLLM and llama.cpp's server take (`top_k`, `repetition_penalty`,
`stop_token_ids`) go in `extra_body`, and only when asked for (OpenAI itself refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmrelay.protocol import LogprobEntry, entries_of
from llmrelay.worker.engines.base import GenerationRequest
from llmrelay.worker.toolcalls import ToolCallDelta


@dataclass
class Call:
    """The SDK arguments of one generation (`chat.completions.create` or `completions.create`)."""

    chat: bool
    args: dict[str, Any]
    extra_body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, req: GenerationRequest, model: str, llama_cpp_python: bool = False) -> Call:
        """`llama_cpp_python`: the upstream is llama-cpp-python's server (a managed one), which
        takes a JSON schema as `{"type": "json_object", "schema": ...}` and ignores OpenAI's
        `json_schema` type."""
        args: dict[str, Any] = {"model": model, "temperature": req.temperature,
                                "top_p": req.top_p}
        if req.max_new_tokens is not None:
            args["max_tokens"] = req.max_new_tokens
        if req.stop:
            args["stop"] = list(req.stop)
        if req.seed is not None:
            args["seed"] = req.seed
        if req.presence_penalty:
            args["presence_penalty"] = req.presence_penalty
        if req.frequency_penalty:
            args["frequency_penalty"] = req.frequency_penalty
        extra: dict[str, Any] = {}
        if req.top_k not in (-1, 0):
            extra["top_k"] = req.top_k
        if req.repetition_penalty != 1.0:
            extra["repetition_penalty"] = req.repetition_penalty
        if req.stop_token_ids:
            extra["stop_token_ids"] = list(req.stop_token_ids)
        if req.logit_bias:
            args["logit_bias"] = {str(t): b for t, b in req.logit_bias.items()}
        if req.messages is not None:
            args["messages"] = req.messages
            if req.logprobs is not None:
                args["logprobs"] = True
                args["top_logprobs"] = req.logprobs
            if req.tools:  # passed on as they are: the upstream enforces them its own way
                args["tools"] = req.tools
                if req.tool_choice is not None:
                    args["tool_choice"] = req.tool_choice
                args["parallel_tool_calls"] = req.parallel_tool_calls
            if req.response_format is not None:
                args["response_format"] = (_as_json_object(req.response_format)
                                           if llama_cpp_python else req.response_format)
            return cls(True, args, extra)
        args["prompt"] = req.prompt_token_ids if req.prompt_token_ids is not None else req.prompt
        if req.echo:
            args["echo"] = True
        if req.logprobs is not None:
            args["logprobs"] = req.logprobs
        return cls(False, args, extra)

    def streamed(self) -> dict[str, Any]:
        """Keyword arguments of the streamed call; the usage is asked for on the last chunk."""
        return {**self.args, "stream": True, "stream_options": {"include_usage": True},
                **({"extra_body": self.extra_body} if self.extra_body else {})}

    def whole(self, **changes: Any) -> dict[str, Any]:
        """Keyword arguments of the same call, not streamed (with `changes`)."""
        return {**self.args, **changes,
                **({"extra_body": self.extra_body} if self.extra_body else {})}


def choice_text(chat: bool, choice: Any) -> str:
    """The text of one choice: a streamed chunk's (`delta` or `text`) or a whole answer's
    (`message` or `text`)."""
    if not chat:
        return getattr(choice, "text", None) or ""
    part = getattr(choice, "delta", None) or getattr(choice, "message", None)
    return (getattr(part, "content", None) or "") if part is not None else ""


def _as_json_object(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt.get("type") != "json_schema":
        return fmt
    schema = (fmt.get("json_schema") or {}).get("schema")
    return {"type": "json_object", **({"schema": schema} if schema else {})}


def choice_tool_calls(choice: Any) -> list[ToolCallDelta]:
    """Tool calls of one choice: a streamed chunk's pieces (`delta.tool_calls`) or a whole
    answer's calls (`message.tool_calls`), as our deltas."""
    part = getattr(choice, "delta", None) or getattr(choice, "message", None)
    out = []
    for i, call in enumerate(getattr(part, "tool_calls", None) or []):
        fn = getattr(call, "function", None)
        index = getattr(call, "index", None)
        out.append(ToolCallDelta(
            index=i if index is None else int(index), id=getattr(call, "id", None) or None,
            name=getattr(fn, "name", None) or None,
            arguments=getattr(fn, "arguments", None) or ""))
    return out


def choice_logprobs(choice: Any) -> list[LogprobEntry]:
    """A choice's logprobs as entries (chat's `content` list or the legacy completion lists)."""
    lp = getattr(choice, "logprobs", None)
    if lp is None:
        return []
    return entries_of(lp.to_dict() if hasattr(lp, "to_dict") else lp)


def usage_of(obj: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an answer's or a last chunk's `usage`, when it says."""
    u = getattr(obj, "usage", None)
    if u is None:
        return None
    return int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0)


def stop_string(choice: Any, stops: list[str]) -> str | None:
    """The stop string that ended an upstream's choice, when it says (vLLM's `stop_reason`
    holds it; a token id there, or no such field, tells nothing)."""
    said = getattr(choice, "stop_reason", None)
    return said if isinstance(said, str) and said in stops else None
