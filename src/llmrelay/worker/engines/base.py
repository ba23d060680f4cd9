"""The engine contract: the only code that knows a model library implements it.

An engine loads one model and serves it through one async entry point, `generate`, an async
iterator of `Chunk`s of new text, and `embed` where the model makes embeddings. A consumer that
stops iterating (the client left) closes the iterator, which stops the generation. Engines that
compute on a thread of their own build on `threaded.ThreadedEngine`, which owns what they share;
an engine that only does I/O (the `openai` engine) runs on the worker's event loop.

What every engine shares lives here: the request type, stop-string handling that never leaks a
partial stop string, chat rendering, and what an engine declares it honours (`Features`).
"""

from __future__ import annotations

import asyncio
import base64
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmrelay.protocol import (
    ErrorCode,
    Features,
    GenerateParams,
    LogprobEntry,
    ParamError,
    ReasoningParams,
)
from llmrelay.worker.constraints import Constraint
from llmrelay.worker.reasoning import Thinking
from llmrelay.worker.templates import ChatTemplate, ChatTemplateError
from llmrelay.worker.toolcalls import ToolCallDelta, speaks_tools


class EngineError(Exception):
    """A request the engine cannot serve; `code` is a FastChat error code, `param` the request
    field at fault when one is (sent in the error frame, so the API server can name it)."""

    def __init__(self, message: str, code: int = ErrorCode.INTERNAL_ERROR,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.param = param


def images_of(messages: list[dict[str, Any]]) -> list[bytes]:
    """The images of chat messages (our `images` extension's parts, `{"type": "image", "data":
    <base64>, ...}`), in the order a chat template meets them; EngineError (a bad request) for
    one that is not base64."""
    out = []
    for m in messages:
        content = m.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image":
                try:
                    out.append(base64.b64decode(str(part.get("data", "")), validate=True))
                except ValueError as e:
                    raise EngineError(f"an image part is not base64: {e}",
                                      ErrorCode.VALIDATION_TYPE_ERROR) from e
    return out


def refused(e: Exception) -> EngineError:
    """The EngineError a refusal before generating becomes (a template that fails, bad params)."""
    if isinstance(e, EngineError):
        return e
    if isinstance(e, (ChatTemplateError, ParamError)):
        return EngineError(str(e), getattr(e, "code", ErrorCode.VALIDATION_TYPE_ERROR))
    if isinstance(e, UnicodeError):  # text no encoding can write (a lone surrogate): the input's
        return EngineError(f"the input holds text that cannot be encoded ({e.reason})",
                           ErrorCode.VALIDATION_TYPE_ERROR)
    return EngineError(f"internal error in the worker: {type(e).__name__}")


def context_overflow(n_ctx: int, n_prompt: int) -> EngineError:
    return EngineError(f"This model's maximum context length is {n_ctx} tokens. However, your "
                       f"prompt has {n_prompt} tokens. Please shorten it.",
                       ErrorCode.CONTEXT_OVERFLOW)


@dataclass
class GenerationRequest:
    """One generation, as an engine receives it (parsed and checked by the worker)."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int | None = 256  # None: the rest of the context
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k: the chosen token plus k alternatives
    echo: bool = False
    request_id: str = ""
    model: str | None = None  # the public name asked for (an upstream server may serve several)
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    generated: list[int] = field(default_factory=list)  # resumed: tokens an earlier worker made
    key: str = ""  # the API key's name, for fair sharing
    priority: str = "interactive"
    # Set by the worker for engines that write tool calls as text (see toolcalls.py):
    template_tools: list[dict[str, Any]] | None = None  # for a chat template that knows tools
    constraint: Constraint | None = None  # what the text must be (tool calls, a JSON schema)
    # Reasoning: what the request asked (our `reasoning` extension), and, set by the worker
    # for a model with a reasoning parser, what the engine enforces (the thinking budget) and
    # what the chat template is given (`enable_thinking`).
    reasoning: ReasoningParams | None = None
    thinking: Thinking | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, p: GenerateParams, template_stops: Sequence[str] = (),
                    request_id: str = "") -> GenerationRequest:
        """The request for wire params; chat messages also stop at the template's stop strings."""
        stop = p.stops
        if p.messages is not None:
            stop += [s for s in template_stops if s not in stop]
        return cls(
            prompt=p.prompt if p.messages is None and p.prompt_token_ids is None else None,
            prompt_token_ids=p.prompt_token_ids if p.messages is None else None,
            messages=p.messages,
            temperature=1.0 if p.temperature is None else p.temperature,
            top_p=1.0 if p.top_p is None else p.top_p,
            top_k=-1 if p.top_k is None else p.top_k,
            max_new_tokens=p.max_new_tokens,
            stop=stop,
            stop_token_ids=list(p.stop_token_ids or []),
            presence_penalty=p.presence_penalty or 0.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            seed=p.seed,
            logprobs=p.logprobs,
            echo=p.echo,
            request_id=p.request_id or request_id,
            model=p.model,
            tools=p.tools or None,
            tool_choice=p.tool_choice,
            parallel_tool_calls=p.parallel_tool_calls is not False,
            response_format=p.response_format,
            logit_bias=_logit_bias(p.logit_bias),
            generated=list(p.generated_token_ids or []),
            key=p.key or "",
            priority=p.priority or "interactive",
            reasoning=p.reasoning,
        )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(k): float(v) for k, v in bias.items()}
    except ValueError:
        raise EngineError("logit_bias keys must be token ids", ErrorCode.VALIDATION_TYPE_ERROR,
                          "logit_bias") from None


@dataclass
class Chunk:
    """New text since the previous chunk; the last chunk has `finish_reason` set
    (`stop`, `length`, or `abort` when the consumer left). `completion_tokens` counts every
    token generated so far. A chunk may carry several tokens when its reader fell behind.
    `stop_sequence`: on the last chunk, the stop string that ended the generation (when the
    engine knows; None when an end token did, or the engine cannot tell)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: list[LogprobEntry] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the tokens generated since the last
    # A resumed generation's first chunk: the text its replayed tokens had made (already sent
    # by the earlier worker; the worker's tool-call parser reads it, nobody else).
    replayed: str | None = None
    stop_sequence: str | None = None
    # Set by the worker when the request asked for reasoning apart (reasoning.py): the
    # reasoning's new text (`text` is then the answer's), and the reasoning tokens so far.
    reasoning: str = ""
    reasoning_tokens: int | None = None
    # On the last chunk, with speculative decoding: (draft tokens proposed, accepted).
    drafted: tuple[int, int] | None = None

    def merge(self, later: Chunk) -> Chunk:
        """This chunk followed by `later`, as one."""
        return Chunk(self.text + later.text, later.prompt_tokens, later.completion_tokens,
                     later.finish_reason, self.logprobs + later.logprobs,
                     self.tool_calls + later.tool_calls, self.token_ids + later.token_ids,
                     self.replayed if self.replayed is not None else later.replayed,
                     later.stop_sequence, self.reasoning + later.reasoning,
                     later.reasoning_tokens,
                     later.drafted if later.drafted is not None else self.drafted)


class StopMatcher:
    """Cuts generated text at the first stop string and holds back a possible partial one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]  # an empty stop string would stop at once
        self.text = ""  # all text accepted so far
        self.emitted = 0  # how much of it has been released
        self.matched: str | None = None  # the stop string that was hit

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to release now, whether a stop string was hit)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += new_text
        hit = -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (hit < 0 or i < hit):
                hit, self.matched = i, s
        if hit >= 0:
            out = self.text[self.emitted : hit]
            self.text = self.text[:hit]
            self.emitted = hit
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return out, False

    def flush(self) -> str:
        """At the end of the generation, release what was held back."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


class Engine(ABC):
    """One loaded model, served on the worker's event loop."""

    name: ClassVar[str] = "base"
    chat_template: ChatTemplate | None = None
    # Whether the engine writes tool calls as text, in the format the worker parses
    # (toolcalls.py), after the worker has put the tools in the prompt; an engine that gets
    # them from an upstream server as they are (the openai engine) says False.
    tool_calls_in_text: ClassVar[bool] = True

    @abstractmethod
    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a generation as chunks of new text; the last has `finish_reason` set. A
        request refused before it starts raises EngineError before the first chunk; closing
        the iterator early stops the generation."""
        raise NotImplementedError
        yield  # an async generator

    async def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """One vector per input (a text or token ids), and the tokens read."""
        raise EngineError(f"the {self.name} engine does not serve embeddings for this model",
                          ErrorCode.VALIDATION_TYPE_ERROR)

    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    async def count_tokens(self, text: str) -> int: ...

    async def count_prompt(self, req: GenerationRequest) -> int:
        """Tokens in a request's prompt: its text, or its chat messages rendered (with the
        tools the worker put in them: `WorkerService.plan`)."""
        if req.messages is None:
            return await self.count_tokens(req.prompt or "")
        return await self.count_tokens(await asyncio.to_thread(
            self.render_chat, req.messages, req.template_tools, req.template_kwargs))

    async def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The token ids the model reads for a request's prompt (text or chat messages), as a
        generation of it would; `features().tokenize` says whether the engine can tell."""
        raise EngineError(f"the {self.name} engine does not give token ids",
                          ErrorCode.VALIDATION_TYPE_ERROR)

    async def text_of(self, tokens: list[int]) -> str:
        """The text of token ids (special tokens written out)."""
        raise EngineError(f"the {self.name} engine does not turn token ids into text",
                          ErrorCode.VALIDATION_TYPE_ERROR)

    def served_names(self) -> list[str]:
        """The names this engine itself knows its models by (an upstream server's model list),
        used when `--model-names` gives none; empty: named after the model path."""
        return []

    def features(self) -> Features:
        """What this engine honours (sent in the worker's status)."""
        return Features(chat=self.chat_template is not None)

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    variables: dict[str, Any] | None = None) -> str:
        """The prompt for chat messages, with the model's chat template (and `tools`, for a
        template that knows them: see `speaks_tools`; `variables`: more for the template, such
        as Qwen3's `enable_thinking`)."""
        if self.chat_template is None:
            raise EngineError("this model has no chat template; use /v1/completions",
                              ErrorCode.VALIDATION_TYPE_ERROR)
        return self.chat_template.render(messages, tools=tools, variables=variables)

    def speaks_tools(self) -> bool:
        """Whether the chat template renders tools itself, in the call format the worker
        parses (`<tool_call>` JSON, as Hermes, Qwen and SmolLM3 templates do); if not, the
        worker writes the tools into the messages (toolcalls.generic_messages)."""
        tpl = self.chat_template
        return tpl is not None and speaks_tools(tpl.source)

    def template_stops(self) -> list[str]:
        return list(self.chat_template.stop) if self.chat_template else []

    def status(self) -> dict[str, Any]:
        """Fields added to the worker's status (`llmrelay` section). `ready: False` (e.g. an
        upstream server that is down) keeps our API servers from routing requests here."""
        return {"ready": True}

    async def start(self) -> None:
        """Called on the worker's event loop before it serves (background tasks, clients)."""

    async def aclose(self) -> None:
        """Free the model (called at shutdown, on the worker's event loop)."""
