"""The engine interface: the only code that knows a model library implements it.

An engine loads one model and streams a generation as `Chunk`s of new text, either as an iterator
(`generate`, run off the event loop) or pushed to a callback (`start`: engines with a scheduler
thread of their own hand chunks straight to the worker's event loop, no thread per request).
What every engine shares lives here: the request type, stop-string handling that never leaks a
partial stop string, and chat rendering.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmrelay.worker.templates import ChatTemplate


class EngineError(Exception):
    """A request the engine cannot serve; `code` is a FastChat error code."""

    def __init__(self, message: str, code: int = 50001) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class GenerationRequest:
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


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """New text since the previous chunk; the last chunk has `finish_reason` set."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


Emit = Callable[["Chunk | Exception | None"], None]
"""Where `Engine.start` delivers a generation: chunks, then None; or an Exception, which ends it."""


class StopMatcher:
    """Cuts generated text at the first stop string and holds back a possible partial one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]  # an empty stop string would stop at once
        self.text = ""  # all text accepted so far
        self.emitted = 0  # how much of it has been released

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to release now, whether a stop string was hit)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += new_text
        hit = -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
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
    """One loaded model. Methods are synchronous; the worker calls them from threads."""

    name = "base"
    chat_template: ChatTemplate | None = None

    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def generate(self, req: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Stream a generation; stop soon after `cancel` is set (finish_reason "abort")."""

    def start(self, req: GenerationRequest, cancel: threading.Event, emit: Emit) -> None:
        """Begin a generation and return at once; its chunks go to `emit` (called from any
        thread), then None; an Exception passed to `emit` ends it instead. A request the engine
        refuses before it starts may raise here. This default runs `generate` in a thread of
        its own; engines with a scheduler thread override it (and implement `generate` with
        `generate_from_start`)."""

        def work() -> None:
            try:
                for chunk in self.generate(req, cancel):
                    emit(chunk)
            except Exception as e:
                emit(e)
                return
            emit(None)

        threading.Thread(target=work, name=f"gen-{req.request_id}", daemon=True).start()

    def generate_from_start(self, req: GenerationRequest,
                            cancel: threading.Event) -> Iterator[Chunk]:
        """`generate` for an engine that implements `start`."""
        q: queue.SimpleQueue[Chunk | Exception | None] = queue.SimpleQueue()
        self.start(req, cancel, q.put)
        try:
            while (item := q.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()  # no-op when finished; stops the generation when the reader left

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self.chat_template is None:
            raise EngineError("this model has no chat template; use /v1/completions", 40001)
        return self.chat_template.render(messages)

    def template_stops(self) -> list[str]:
        return list(self.chat_template.stop) if self.chat_template else []

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        raise EngineError(f"the {self.name} engine does not serve embeddings for this model", 40001)

    def supports_embeddings(self) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        """Fields added to the worker's status (`llmrelay` section). `ready: False` (e.g. an
        upstream server that is down) keeps our API servers from routing requests here."""
        return {"ready": True}

    def close(self) -> None:
        """Free the model (called at shutdown)."""
