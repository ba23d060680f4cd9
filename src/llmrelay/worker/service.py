"""What a model worker does, as plain Python over one engine: admission, generations as frames,
whole answers, status, token counts, the conversation template, embeddings. `app.py` is the
HTTP face over it; tests can drive it without a server.

Model work never runs on the event loop (the engines compute on threads of their own or do
I/O), so status, heartbeats and token counts answer while a long generation runs.
`--limit-worker-concurrency` bounds the requests admitted at once; the rest wait (queue length
= running + waiting), up to `--max-queue`. A reader that leaves cancels its generation, in the
queue or running.

Frames follow FastChat (`text` cumulative) unless the request asks for `delta: true` (our
addition), where `text` is only the new text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmrelay import __version__
from llmrelay.fastchat_conv import STYLES_0_2_36, describe
from llmrelay.jsonguard import SURROGATE_MESSAGE, surrogate_in
from llmrelay.metrics import WorkerMetrics
from llmrelay.protocol import (
    EXT_IMAGES,
    OUR_EXTENSIONS,
    ErrorCode,
    Frame,
    GenerateParams,
    LogprobEntry,
    ParamError,
    ToolCallWire,
    add_call_piece,
    error_frame,
    loads,
    text_offsets,
    to_legacy,
    usage,
)
from llmrelay.worker import constraints, reasoning, toolcalls
from llmrelay.worker.engines.base import Chunk, Engine, EngineError, GenerationRequest, refused
from llmrelay.worker.fairness import FairQueue, Full
from llmrelay.worker.templates import ChatTemplateError

log = logging.getLogger("llmrelay.worker")


@dataclass
class WorkerSettings:
    worker_address: str
    model_names: list[str]
    controller_addresses: list[str] = field(default_factory=list)
    limit_worker_concurrency: int = 5
    stream_interval: int = 1
    heartbeat_interval: float = 3.0
    register: bool = True
    token: str | None = None  # the cluster's registration token (security.py)
    max_queue: int = 32  # requests that may wait beyond the running ones
    fair_sharing: bool = True  # off: waiting requests run first come, first served
    fair_reserve: int = 0  # places beyond the limit for keys with nothing running (fairness.py)
    reasoning_parser: str = "auto"  # reasoning.py's format name, `auto` (the template's) or none


class WorkerState:
    """Admission and counters; plain Python. At most `limit` requests run; the others wait in
    a fair queue (fairness.py: priority class, then the key with the least service). The queue
    is bounded: past `max_queue` waiting requests, and while draining for shutdown, new
    requests are refused (EngineError 42903), which the API server answers by trying another
    worker, then with 429; a key's fair share survives a full queue (`admit`). With `fair`
    off (`--fair-sharing off`) keys and priorities are ignored: first come, first served."""

    def __init__(self, limit: int, max_queue: int = 32, fair: bool = True,
                 reserve: int = 0) -> None:
        self.queue = FairQueue(limit, reserve=reserve if fair else 0)
        self.fair = fair
        self.limit = self.queue.limit
        self.max_queue = max(0, max_queue)
        self.served = 0
        self.draining = False

    @property
    def running(self) -> int:
        return self.queue.running

    @property
    def waiting(self) -> int:
        return len(self.queue.waiting)

    @property
    def queue_length(self) -> int:
        return self.running + self.waiting

    def admit(self, key: str = "", priority: str = "interactive") -> None:
        """Refuse at once when this worker cannot take the request (full or shutting down).
        With fair sharing a full queue still takes a request of a key with nothing running into
        a free reserve place, or one of a key holding fewer places than another key does, which
        loses its newest waiter (fairness.py, `make_room`)."""
        if self.draining:
            raise EngineError("this worker is shutting down", ErrorCode.ENGINE_OVERLOADED)
        if self.running >= self.limit and self.waiting >= self.max_queue and not (
                self.fair and self.queue.make_room(key, priority)):
            raise EngineError(f"this worker is full ({self.running} running, {self.waiting} "
                              "waiting)", ErrorCode.ENGINE_OVERLOADED)

    @contextlib.asynccontextmanager
    async def slot(self, key: str = "", priority: str = "interactive") -> AsyncIterator[None]:
        if not self.fair:
            key, priority = "", "interactive"
        self.admit(key, priority)
        try:
            await self.queue.acquire(key, priority)
        except Full as e:
            raise EngineError(f"this worker is full: {e}", ErrorCode.ENGINE_OVERLOADED) from None
        try:
            yield
        finally:
            self.served += 1
            self.queue.release(key)


class Framer:
    """Engine chunks -> frames: FastChat's (cumulative text and legacy logprobs) or our delta
    frames. Keeps the whole text and every logprob entry with its offset in that text."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.text = ""
        self.reasoning = ""
        self.reasoning_tokens = 0
        self.entries: list[LogprobEntry] = []
        self.offsets: list[int] = []
        self.calls: list[ToolCallWire] = []  # whole tool calls so far
        self.last: Frame | None = None

    def make(self, chunk: Chunk) -> Frame:
        self.offsets += text_offsets(chunk.logprobs, len(self.text))
        self.entries += chunk.logprobs
        self.text += chunk.text
        out: Frame = {"text": chunk.text if self.delta else self.text, "error_code": 0,
                      "usage": usage(chunk.prompt_tokens, chunk.completion_tokens),
                      "finish_reason": chunk.finish_reason}
        if self.delta:
            out["logprobs"] = {"content": chunk.logprobs} if chunk.logprobs else None
            if chunk.token_ids:
                out["token_ids"] = chunk.token_ids
        else:
            out["logprobs"] = to_legacy(self.entries, self.offsets) if self.entries else None
        if chunk.stop_sequence is not None:
            out["stop_sequence"] = chunk.stop_sequence
        if chunk.reasoning_tokens is not None:  # the request asked for reasoning apart
            self.reasoning += chunk.reasoning
            self.reasoning_tokens = chunk.reasoning_tokens
            out["usage"]["reasoning_tokens"] = chunk.reasoning_tokens
            if chunk.reasoning:
                out["reasoning"] = chunk.reasoning if self.delta else self.reasoning
        if chunk.tool_calls:
            out["tool_calls"] = [d.wire() for d in chunk.tool_calls]  # type: ignore[misc]
            for piece in out["tool_calls"]:
                add_call_piece(self.calls, piece)
        self.last = out
        return out

    def whole(self) -> Frame:
        """The whole answer as one frame: FastChat's last cumulative frame, or one delta frame
        joining them all, whose logprobs also carry each token's `text_offset` in `text` (an
        echoed prompt has no logprob entries)."""
        final: Frame = dict(self.last or {"error_code": 0})  # type: ignore[assignment]
        if self.delta:
            final["text"] = self.text
            if self.reasoning:
                final["reasoning"] = self.reasoning
            final["logprobs"] = ({"content": self.entries, "text_offset": self.offsets}
                                 if self.entries else None)
            final.pop("tool_calls", None)
            final.pop("token_ids", None)
            if self.calls:
                final["tool_calls"] = self.calls
        return final


def engine_error_frame(e: Exception) -> Frame:
    err = refused(e)
    return error_frame(str(err), err.code, err.param)


class WorkerService:
    """One worker's endpoints as methods (see the module docstring)."""

    def __init__(self, engine: Engine, settings: WorkerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.state = WorkerState(settings.limit_worker_concurrency, settings.max_queue,
                                 settings.fair_sharing, settings.fair_reserve)
        self.metrics = WorkerMetrics(self.state)
        self._conv: dict[str, Any] | None = None
        template = engine.chat_template.source if engine.chat_template is not None else None
        # (an upstream server splits reasoning itself: the openai engine passes it on)
        self.reasoning = (reasoning.choose(settings.reasoning_parser, template)
                          if engine.tool_calls_in_text else None)

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        engine = self.engine
        features = engine.features()
        return {
            "model_names": self.settings.model_names,
            "speed": 1,
            "queue_length": self.state.queue_length,
            "llmrelay": {
                "version": __version__,
                # (images only to a worker whose engine reads them: docs/images.md)
                "extensions": OUR_EXTENSIONS + ([EXT_IMAGES] if features.vision else []),
                "engine": engine.name,
                "context_length": engine.context_length(),
                "features": {**features.model_dump(),
                             "reasoning": self.reasoning.name if self.reasoning else ""},
                "embeddings": features.embeddings,
                "embedding_dimensions": features.embedding_dimensions,
                "limit_worker_concurrency": self.state.limit,
                "fair_sharing": self.state.fair,
                "fair_reserve": self.state.queue.reserve,
                "running": self.state.running,
                "served": self.state.served,
                "pid": os.getpid(),
                **engine.status(),  # e.g. `ready`, and an upstream server's health
            },
        }

    # ---- generation --------------------------------------------------------------------------

    def parse(self, body: bytes) -> tuple[GenerationRequest, bool]:
        """A generation's body -> (request, delta mode); EngineError 40001/40302 when refused."""
        try:
            data = loads(body)
        except ValueError as e:
            raise EngineError(f"the body is not valid JSON: {e}",
                              ErrorCode.VALIDATION_TYPE_ERROR) from e
        check_text(body, data)
        try:
            params = GenerateParams.parse(data)
        except ParamError as e:
            raise refused(e) from None
        req = GenerationRequest.from_params(params, self.engine.template_stops(),
                                            uuid.uuid4().hex[:12])
        return req, params.delta

    async def frames(self, req: GenerationRequest, delta: bool,
                     framer: Framer | None = None) -> AsyncIterator[Frame]:
        """The generation's frames, one per chunk; a refusal or failure is an error frame (the
        last one). The engine stops when the reader leaves."""
        framer = framer or Framer(delta)
        interval = self.settings.stream_interval
        started = time.monotonic()
        first_at: float | None = None
        sent_tokens = 0
        drafted: tuple[int, int] | None = None  # speculative decoding: (proposed, accepted)
        outcome = "cancelled"  # unless it ends otherwise: the reader went away
        try:
            self.plan(req)
            charged_prompt = charged = 0  # tokens counted for fair sharing so far
            # aclosing: a reader that leaves closes the engine's generator now (which stops
            # the generation), not whenever the garbage collector finalizes it.
            async with self.state.slot(req.key, req.priority), \
                    contextlib.aclosing(self._chunks(req)) as chunks:
                async for chunk in chunks:
                    if first_at is None:
                        first_at = time.monotonic()
                    if chunk.drafted is not None:
                        drafted = chunk.drafted
                    # (an upstream server may say its prompt's size only at the end)
                    self.state.queue.charge(req.key, max(0, chunk.prompt_tokens - charged_prompt),
                                            max(0, chunk.completion_tokens - charged))
                    charged_prompt = max(charged_prompt, chunk.prompt_tokens)
                    charged = max(charged, chunk.completion_tokens)
                    f = framer.make(chunk)
                    if (not delta and chunk.finish_reason is None
                            and chunk.completion_tokens - sent_tokens < interval):
                        continue  # FastChat's --stream-interval: a frame every N tokens
                    sent_tokens = chunk.completion_tokens
                    yield f
            outcome = "ok"
        except (EngineError, ChatTemplateError) as e:
            err = refused(e)
            outcome = "refused" if err.code == ErrorCode.ENGINE_OVERLOADED else "invalid"
            log.info("request %s refused: %s", req.request_id, err)
            yield error_frame(str(err), err.code, err.param)
            return
        except Exception as e:  # never a silent cut: the reader gets an error frame
            outcome = "error"
            log.error("request %s failed", req.request_id, exc_info=e)
            yield engine_error_frame(e)
            return
        finally:
            self._observe(req, outcome, started, first_at, framer.last, drafted)
        if framer.last is not None:
            u = framer.last["usage"]
            spec = f", {drafted[1]}/{drafted[0]} draft tokens accepted" if drafted else ""
            log.info("request %s: %d prompt + %d completion tokens, %s, %.2f s%s", req.request_id,
                     u["prompt_tokens"], u["completion_tokens"], framer.last["finish_reason"],
                     time.monotonic() - started, spec)

    def plan(self, req: GenerationRequest) -> None:
        """Check what the request asks for against what the engine honours, and, for an engine
        that writes tool calls as text, put the tools in the prompt (the template's own way,
        or the generic prompt) and the constraint on the generation (constraints.py)."""
        engine = self.engine
        features = engine.features()
        self.plan_reasoning(req)
        for param, wanted, honoured in (
                ("tools", req.tools and req.tool_choice != "none", features.tools),
                ("response_format", constraints.response_schema(req.response_format) is not None,
                 features.json_schema),
                ("logit_bias", req.logit_bias, features.logit_bias)):
            if wanted and not honoured:
                raise EngineError(f"{param} is not supported by the {engine.name} engine of "
                                  f"this worker", ErrorCode.VALIDATION_TYPE_ERROR)
        if not engine.tool_calls_in_text:
            return
        tools = req.tools if req.tool_choice != "none" else None
        if req.messages is not None and (tools or any(
                m.get("role") == "tool" or m.get("tool_calls") for m in req.messages)):
            if tools and engine.speaks_tools():
                req.messages = toolcalls.template_messages(req.messages)
                req.template_tools = [t if "function" in t else {"type": "function", "function": t}
                                      for t in tools]
            else:
                req.messages = toolcalls.generic_messages(req.messages, tools,
                                                          req.tool_choice or "auto",
                                                          req.parallel_tool_calls)
        schema = constraints.response_schema(req.response_format)
        if tools:
            req.constraint = constraints.for_tools(tools, req.tool_choice or "auto",
                                                   req.parallel_tool_calls, schema)
        elif schema is not None:
            req.constraint = constraints.Constraint(schema=schema)
        if req.thinking is not None and req.constraint is not None:
            # the model reasons first: the constraint holds from the end of its reasoning
            req.constraint = dataclasses.replace(req.constraint,
                                                 after=req.thinking.format.close, key="")

    def plan_reasoning(self, req: GenerationRequest) -> None:
        """A request that asks for its reasoning apart (our `reasoning` extension), on a model
        with a reasoning parser: the engine follows the block within the budget asked for, and
        a template that can switch thinking off (Qwen3's `enable_thinking`) is told so."""
        fmt, asked = self.reasoning, req.reasoning
        if fmt is None or asked is None or not self.engine.tool_calls_in_text:
            return
        budget = asked.budget
        if asked.enabled is False:
            source = self.engine.chat_template.source if self.engine.chat_template else ""
            if "enable_thinking" in source:
                req.template_kwargs["enable_thinking"] = False
            budget = 0  # a template that always opens the block: it is closed at once
        req.thinking = reasoning.Thinking(fmt, budget)

    async def _chunks(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        """The engine's chunks: with reasoning asked for, their text split into reasoning and
        answer; with tools, the answer split into content and tool calls. Closing this closes
        each step, down to the engine's generation (which stops it)."""
        chunks = self.engine.generate(req)
        if req.thinking is not None:
            chunks = self._reasoned(req, chunks)
        if bool(req.tools) and req.tool_choice != "none" and self.engine.tool_calls_in_text:
            chunks = self._tool_calls(req, chunks)
        async with contextlib.aclosing(chunks) as reader:
            async for chunk in reader:
                yield chunk

    @staticmethod
    async def _reasoned(req: GenerationRequest, chunks: AsyncIterator[Chunk]
                        ) -> AsyncIterator[Chunk]:
        """Each chunk's text split into its reasoning and its answer (reasoning.py); the
        reasoning tokens are those generated until the block closed, its closing included."""
        assert req.thinking is not None
        parser = reasoning.ReasoningParser(req.thinking.format)
        thought = 0
        async with contextlib.aclosing(chunks) as reader:
            async for chunk in reader:
                replayed = None
                if chunk.replayed:  # resumed: the earlier worker's text, split as it was
                    replayed = parser.feed(chunk.replayed)[1]
                was_open = parser.in_reasoning
                text, answer = parser.feed(chunk.text)
                if chunk.finish_reason:
                    more, tail = parser.finish()
                    text, answer = text + more, answer + tail
                if was_open:
                    thought = chunk.completion_tokens
                yield dataclasses.replace(chunk, text=answer, reasoning=text,
                                          reasoning_tokens=thought,
                                          replayed=replayed if chunk.replayed else None)

    @staticmethod
    async def _tool_calls(req: GenerationRequest, chunks: AsyncIterator[Chunk]
                          ) -> AsyncIterator[Chunk]:
        """Each chunk's text split into content and tool calls (toolcalls.py); a repeated call
        ends the generation."""
        named = isinstance(req.tool_choice, dict)
        parser = toolcalls.ToolCallParser(hold_repeats=req.parallel_tool_calls and not named,
                                          forced=named or req.tool_choice == "required")
        async with contextlib.aclosing(chunks) as reader:
            async for chunk in reader:
                if chunk.replayed:  # resumed: what the earlier worker parsed (and sent) before
                    parser.feed(chunk.replayed)
                text, calls = parser.feed(chunk.text)
                reason = chunk.finish_reason
                if parser.repeated:  # a call made twice: the turn ends with the calls so far
                    reason = "stop"
                if reason:
                    tail, more = parser.finish()
                    text, calls = text + tail, calls + more
                if reason == "stop" and parser.calls:
                    reason = "tool_calls"
                yield dataclasses.replace(chunk, text=text, tool_calls=calls, finish_reason=reason)
                if reason:
                    return  # closing the engine's generation ends it (a repeated call)

    async def answer(self, req: GenerationRequest, delta: bool) -> Frame:
        """The whole answer as one frame (`Framer.whole`), or the error frame."""
        framer = Framer(delta)
        async with contextlib.aclosing(self.frames(req, delta, framer)) as frames:
            async for f in frames:
                if f.get("error_code"):
                    return f
        return framer.whole()

    def _observe(self, req: GenerationRequest, outcome: str, started: float,
                 first_at: float | None, last: Frame | None,
                 drafted: tuple[int, int] | None = None) -> None:
        names = self.settings.model_names
        model = req.model if req.model in names else names[0]
        m = self.metrics
        m.requests.labels(model, outcome).inc()
        m.latency.labels(model).observe(time.monotonic() - started)
        if first_at is not None:
            m.ttft.labels(model).observe(first_at - started)
        u = (last or {}).get("usage") or {}
        m.prompt_tokens.labels(model).inc(int(u.get("prompt_tokens") or 0))
        m.completion_tokens.labels(model).inc(int(u.get("completion_tokens") or 0))
        if drafted is not None:
            m.draft_proposed.labels(model).inc(drafted[0])
            m.draft_accepted.labels(model).inc(drafted[1])
        if outcome == "cancelled":
            log.info("request %s cancelled by the client after %d completion tokens, %.2f s",
                     req.request_id, int(u.get("completion_tokens") or 0),
                     time.monotonic() - started)

    # ---- the small endpoints -----------------------------------------------------------------

    async def count_token(self, body: dict[str, Any]) -> dict[str, Any]:
        """FastChat's `{"prompt": text}`; ours also chat messages as `prompt` (or `messages`),
        with `tools` (see `prompt_request`)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) or body.get("messages") is not None:
            return {"count": await self.engine.count_prompt(self.prompt_request(body)),
                    "error_code": 0}
        if not isinstance(prompt, str):
            raise EngineError("prompt must be a string", ErrorCode.VALIDATION_TYPE_ERROR)
        return {"count": await self.engine.count_tokens(prompt), "error_code": 0}

    def prompt_request(self, body: dict[str, Any]) -> GenerationRequest:
        """A prompt to count or tokenize, as a generation of it would read it: `prompt` (text,
        or chat messages from our API server), `messages`, or `prompt_token_ids`; chat
        messages with their `tools` and `tool_choice` put in them as for a generation
        (`plan`). EngineError 40001 when refused."""
        fields = {k: body[k] for k in ("model", "prompt", "messages", "prompt_token_ids", "tools",
                                       "tool_choice", "parallel_tool_calls") if k in body}
        if isinstance(fields.get("prompt"), list):
            fields["messages"] = fields.pop("prompt")
        try:
            params = GenerateParams.parse(fields)
        except ParamError as e:
            raise refused(e) from None
        req = GenerationRequest.from_params(params, self.engine.template_stops())
        self.plan(req)
        return req

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """The token ids of a prompt (`prompt_request`), as the model reads it."""
        ids = await self.engine.prompt_ids(self.prompt_request(body))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.context_length(),
                "error_code": 0}

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """The text of `tokens` (token ids)."""
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise EngineError("tokens must be a list of token ids", ErrorCode.VALIDATION_TYPE_ERROR)
        return {"prompt": await self.engine.text_of(tokens), "error_code": 0}

    def model_details(self) -> dict[str, Any]:
        return {"context_length": self.engine.context_length()}

    async def conv_template(self) -> dict[str, Any]:
        """The model's chat template as a FastChat conversation (made once). FastChat's API
        server renders prompts with it; it is read off the model's own chat template
        (fastchat_conv.describe), not hand-written per model as FastChat does."""
        if self._conv is None:
            self._conv = await asyncio.to_thread(self._describe_template)
        return {"conv": self._conv}

    def _describe_template(self) -> dict[str, Any]:
        engine = self.engine
        tpl = engine.chat_template
        d = describe(engine.render_chat, f"llmrelay-{tpl.name if tpl else 'none'}",
                     engine.template_stops())
        if not d.exact:
            log.warning(
                "the chat template of %s cannot be expressed exactly as a FastChat conversation: "
                "/worker_get_conv_template describes the closest one (%s style), so prompts "
                "rendered by FastChat's API server differ from the model's template (%s). Our "
                "API server is not affected: it sends chat messages and the worker renders them.",
                ", ".join(self.settings.model_names), STYLES_0_2_36[d.conv["sep_style"] - 1],
                d.note)
        return {**d.conv, "llmrelay_exact": d.exact}

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, list) and texts and all(_is_int(t) for t in texts):
            texts = [texts]  # one input given as token ids
        if not isinstance(texts, list) or not all(
                isinstance(t, str) or (isinstance(t, list) and all(_is_int(i) for i in t))
                for t in texts):
            raise EngineError("input must be a string, a list of strings, or token id arrays",
                              ErrorCode.VALIDATION_TYPE_ERROR)
        async with self.state.slot():
            vectors, n = await self.engine.embed(texts)
        return {"embedding": vectors, "token_num": n}


def check_text(body: bytes, data: Any) -> None:
    """EngineError 40001 naming the field when the body's text holds a lone surrogate (the
    tokenizer could not encode it): the input's fault, never the worker's."""
    where = surrogate_in(body, data)
    if where is not None:
        raise EngineError(f"{where} {SURROGATE_MESSAGE}", ErrorCode.VALIDATION_TYPE_ERROR, where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
