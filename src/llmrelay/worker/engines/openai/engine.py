"""The `openai` engine: one OpenAI-compatible base URL (…/v1), maybe a managed child server,
served entirely on the worker's event loop through the official SDK's `AsyncOpenAI`.

- One pooled client, made in `start` on the serving loop; the SDK never retries by itself
  (`max_retries=0`): our API server decides where a failed request goes next.
- Generations are always streamed from the upstream and passed on chunk by chunk; a consumer
  that stops reading closes this generator, which closes the upstream stream (the upstream
  stops generating).
- The health loop (`health.py`) runs as a task from `start`; while the upstream is down,
  generations, embeddings and counts are refused at once with a 5xx code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import openai

from llmrelay.protocol import ErrorCode, Features
from llmrelay.worker import managed as mg
from llmrelay.worker.engines.base import Chunk, Engine, EngineError, GenerationRequest
from llmrelay.worker.engines.openai.calls import (
    Call,
    choice_logprobs,
    choice_text,
    choice_tool_calls,
    stop_string,
    usage_of,
)
from llmrelay.worker.engines.openai.errors import (
    cause_name,
    describe,
    event_error,
    is_connect_failure,
    is_dropped,
    once_more_if_dropped,
    status_error,
)
from llmrelay.worker.engines.openai.health import Health
from llmrelay.worker.engines.openai.options import Options
from llmrelay.worker.engines.openai.tokens import DETOKENIZERS, TOKENIZERS, Counter

T = TypeVar("T")
CONNECT_TIMEOUT = 5.0
# The pool: as many connections as requests in flight, 64 kept alive between them.
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)


class OpenAIEngine(Engine):
    """Fronts one OpenAI-compatible base URL, optionally a managed child server."""

    name = "openai"
    # Messages, tools and formats go to the upstream as they are (its own template renders
    # tools, calls and results; it enforces schemas its own way); its calls come back whole.
    tool_calls_in_text = False

    def __init__(self, options: Options, server: mg.ManagedServer | None = None,
                 models: list[dict[str, Any]] | None = None) -> None:
        self.options = options
        self.base_url = options.base_url
        self.names = list(options.names)
        self.server = server
        self.health = Health(options.base_url, models)
        self._client: openai.AsyncOpenAI | None = None
        self._counter: Counter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = 0  # requests at the upstream now

    # -- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Make the client on the serving loop, look at the upstream once, then keep looking."""
        self._loop = asyncio.get_running_loop()
        o = self.options
        self._client = openai.AsyncOpenAI(
            base_url=o.base_url,
            # The SDK wants a key; an upstream without keys ignores this one.
            api_key=o.api_key or "none",
            max_retries=0,
            timeout=httpx.Timeout(o.timeout, connect=CONNECT_TIMEOUT),
            http_client=httpx.AsyncClient(limits=LIMITS,
                                          timeout=httpx.Timeout(o.timeout, connect=CONNECT_TIMEOUT)))
        self._counter = Counter(self._client, o.base_url)
        await self.health.check(self._client)  # ready (or not) before the first registration
        self._spawn(self._health_loop())
        if self.server is not None:
            self.server.on_exit = self._server_exited

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.check_interval)
            await self.health.check(self.client, busy=self._running > 0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _server_exited(self, code: int) -> None:  # the managed server's monitor thread
        if self._loop is None or self.server is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            self._loop.call_soon_threadsafe(self.health.note, False,
                                            f"{self.server.name} exited with code {code}")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self.server is not None:
            # Blocks until the child has exited (SIGTERM, then SIGKILL after 20 s): off the loop.
            await asyncio.to_thread(self.server.stop)

    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            raise EngineError("the openai engine was not started (engine.start())")
        return self._client

    # -- what it serves -------------------------------------------------------------------------
    def served_names(self) -> list[str]:
        return self.names or self.health.ids

    def model_for(self, public: str | None) -> str:
        """The upstream model id for a public name."""
        if self.options.upstream_model:
            return self.options.upstream_model
        ids = self.health.ids
        if public and public in ids:
            return public
        if ids:
            return ids[0]
        return public or (self.names[0] if self.names else "default")

    def context_length(self) -> int:
        if self.options.context_length:
            return self.options.context_length
        for m in self.health.models:  # vLLM says it; others do not
            for key in ("max_model_len", "context_length", "context_window"):
                if isinstance(m.get(key), int):
                    return int(m[key])
        return 0

    def features(self) -> Features:
        # The upstream decides the rest: its refusal comes back with its meaning.
        return Features(chat=True, completions=True, prompt_token_ids=True, logprobs=True,
                        top_logprobs=20, seed=True, penalties=True, embeddings=True,
                        tools=True, json_schema=True, logit_bias=True, tokenize=True)

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    variables: dict[str, Any] | None = None) -> str:
        raise EngineError("chat messages are rendered by the upstream server with its own chat "
                          "template; this worker cannot render them", ErrorCode.VALIDATION_TYPE_ERROR)

    def status(self) -> dict[str, Any]:
        up = self.health.status()
        if self.server is not None:
            up["managed"] = self.server.status()
        return {"ready": self.health.healthy, "upstream": up}

    # -- failures -------------------------------------------------------------------------------
    def _transport_error(self, e: openai.APIConnectionError) -> EngineError:
        if is_connect_failure(e):  # down: say so now, and look again at once
            self.health.note(False, describe(e))
            self._spawn(self.health.check(self.client))
        return EngineError(f"the upstream server {self.base_url} failed ({cause_name(e)})",
                           ErrorCode.INTERNAL_ERROR)

    def _failure(self, e: openai.APIError, what: str) -> EngineError:
        if isinstance(e, openai.APIStatusError):
            return status_error(e, what)
        if isinstance(e, openai.APIConnectionError):
            return self._transport_error(e)
        return event_error(e)

    # -- generation -----------------------------------------------------------------------------
    async def _create(self, chat: bool, args: dict[str, Any]) -> Any:
        """`create` on the chat or completions endpoint; an SDK error becomes an EngineError."""
        api = self.client.chat.completions if chat else self.client.completions
        try:
            return await once_more_if_dropped(lambda: api.create(**args))
        except openai.APIError as e:
            raise self._failure(e, "generation") from e

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        self.health.refuse_if_down()
        self._running += 1
        try:
            async with contextlib.aclosing(self._generate(req)) as chunks:
                async for c in chunks:
                    yield c
        finally:
            self._running -= 1

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        managed = self.options.managed
        call = Call.of(req, self.model_for(req.model),
                       llama_cpp_python=managed is not None and managed.server == "llama-cpp-server")
        stream = await self._create(call.chat, call.streamed())
        said: tuple[int, int] | None = None  # the upstream's usage, when it sends it
        pieces = 0  # tokens streamed, as far as the pieces tell
        finish: str | None = None
        stop_hit: str | None = None  # the stop string that ended it, when the upstream says
        seen = 0  # chunks received
        try:
            async for chunk in stream:
                seen += 1
                said = usage_of(chunk) or said
                for choice in chunk.choices or []:
                    text = choice_text(call.chat, choice)
                    lps = choice_logprobs(choice) if req.logprobs is not None else []
                    calls = choice_tool_calls(choice) if call.chat else []
                    if text or lps or calls:
                        pieces += len(lps) or 1
                        yield Chunk(text, said[0] if said else 0,
                                    said[1] if said else pieces, logprobs=lps, tool_calls=calls)
                    if choice.finish_reason:
                        finish = str(choice.finish_reason)
                        stop_hit = stop_string(choice, req.stop)
        except openai.APIError as e:
            if seen or not is_dropped(e):
                raise self._failure(e, "generation") from e
            # (a connection dropped with nothing sent: handled as an empty stream just below)
        finally:
            await stream.close()  # early (the consumer left): closes the upstream request
        if not seen:
            # Some servers (llama.cpp's) end a stream without a word when the request fails
            # before the first token (e.g. a prompt over the context): ask once more, unstreamed,
            # to get the error with its meaning (or, if it works this time, the answer).
            async for c in self._unstreamed(call, req):
                yield c
            return
        if finish is None:
            raise EngineError("the upstream server closed the stream mid-generation",
                              ErrorCode.INTERNAL_ERROR)
        prompt = said[0] if said and said[0] > 0 else await self._count_prompt(call)
        # The upstream's own count when it gives one (the pieces also count an echoed prompt).
        yield Chunk("", prompt, said[1] if said and said[1] > 0 else pieces, finish,
                    stop_sequence=stop_hit)

    async def _count_prompt(self, call: Call) -> int:
        assert self._counter is not None
        return await self._counter.prompt_tokens(call)

    async def _unstreamed(self, call: Call, req: GenerationRequest) -> AsyncIterator[Chunk]:
        answer = await self._create(call.chat, call.whole())
        try:
            choice = answer.choices[0]
        except (AttributeError, IndexError, TypeError) as e:
            raise EngineError(f"the upstream's reply is malformed ({e})") from e
        text = choice_text(call.chat, choice)
        lps = choice_logprobs(choice) if req.logprobs is not None else []
        said = usage_of(answer)
        prompt = said[0] if said and said[0] > 0 else await self._count_prompt(call)
        # OpenAI's whole answers carry usage; one without it is counted by its logprobs.
        completion = said[1] if said else len(lps)
        calls = choice_tool_calls(choice) if call.chat else []
        if text or calls:
            yield Chunk(text, prompt, completion, logprobs=lps, tool_calls=calls)
        yield Chunk("", prompt, completion, str(choice.finish_reason or "stop"),
                    stop_sequence=stop_string(choice, req.stop))

    # -- embeddings and counts ------------------------------------------------------------------
    async def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        self.health.refuse_if_down()
        try:
            r = await self.client.embeddings.create(model=self.model_for(None), input=inputs,
                                                    encoding_format="float")
        except openai.APIError as e:
            raise self._failure(e, "embeddings request") from e
        try:
            vectors = [list(d.embedding) for d in sorted(r.data, key=lambda d: d.index or 0)]
        except (AttributeError, TypeError) as e:
            raise EngineError(f"the upstream's embeddings reply is malformed ({e})") from e
        if any(v and isinstance(v[0], list) for v in vectors):
            raise EngineError(
                "the upstream returned one vector per token (its model has no pooling): start it "
                "with pooling, e.g. llama.cpp's server with `--kv_overrides "
                "llama.pooling_type=int:1` (mean)", ErrorCode.INTERNAL_ERROR)
        return vectors, int(getattr(r.usage, "prompt_tokens", 0) or 0)

    async def count_tokens(self, text: str) -> int:
        """Tokens in `text` by the upstream's tokenize endpoint (tokens.py)."""
        return await self._ask(lambda c: c.count_text(text, self.model_for(None)),
                               "token counting", "tokenize")

    async def count_prompt(self, req: GenerationRequest) -> int:
        """Chat messages are rendered by the upstream only: their count is its own, from a
        one-token answer (tokens.py)."""
        if req.messages is None:
            return await self.count_tokens(req.prompt or "")
        self.health.refuse_if_down()
        assert self._counter is not None
        call = Call.of(req, self.model_for(req.model))
        try:
            return await self._counter.chat_prompt_tokens(call)
        except openai.APIError as e:
            raise self._failure(e, "token count") from e
        except ValueError as e:
            raise EngineError(f"the upstream did not say the prompt's size ({e})") from e

    async def prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            raise EngineError("token ids of chat messages are not offered by this worker: its "
                              "upstream renders them with its own template (tokenize a prompt "
                              "text instead)", ErrorCode.VALIDATION_TYPE_ERROR)
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        text = req.prompt or ""
        return await self._ask(lambda c: c.ids(text, self.model_for(req.model)), "tokenizing",
                               "tokenize")

    async def text_of(self, tokens: list[int]) -> str:
        return await self._ask(lambda c: c.text(tokens, self.model_for(None)), "detokenizing",
                               "detokenize")

    async def _ask(self, question: Callable[[Counter], Awaitable[T | None]], what: str,
                   kind: str) -> T:
        """A question to the upstream's `kind` (tokenize, detokenize) endpoint (tokens.py)."""
        self.health.refuse_if_down()
        assert self._counter is not None
        try:
            answer = await question(self._counter)
        except openai.APIError as e:
            raise self._failure(e, what) from e
        except ValueError as e:  # its endpoint answered something else
            raise EngineError(f"the upstream's {kind} answer is malformed ({e})") from e
        if answer is None:
            paths = TOKENIZERS if kind == "tokenize" else DETOKENIZERS
            raise EngineError(
                f"{what} is not offered by this worker: its upstream {self.base_url} has no "
                f"{kind} endpoint ({', '.join(p for p, _ in paths)} at its root)",
                ErrorCode.VALIDATION_TYPE_ERROR)
        return answer
