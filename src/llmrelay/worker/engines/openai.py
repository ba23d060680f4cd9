"""The `openai` engine: a worker in front of any OpenAI-compatible server.

`vllm serve`, llama.cpp's server, Ollama, another llmrelay: anything with `/v1/models`,
`/v1/chat/completions`, `/v1/completions` (and maybe `/v1/embeddings`) can sit behind our
controller. Chat requests (the worker receives `messages`) go to the upstream's chat endpoint,
prompts and token ids to its completions endpoint, embeddings to its embeddings endpoint, all
streamed through as they come.

- One pooled `httpx.AsyncClient`, on the engine's own event loop in a background thread. The
  worker's engine interface is synchronous (run in a thread per request), so `generate` drives
  the async stream from that thread; when the worker sets the request's `cancel` Event (the
  client went away), the stream is closed, which closes the upstream request.
- Upstream errors keep their meaning: HTTP statuses become FastChat error codes (`map_error`),
  which our API server maps back (400 stays 400, 404 model -> 404, 429 -> 429, 5xx -> the API
  server tries another worker, then 503).
- The upstream's health decides the worker's: `/v1/models` is polled; while it fails the worker
  says `ready: false` in its status (our API server routes nothing here, the controller keeps it
  listed) and refuses generations at once with a 5xx code, so a FastChat API server fails over.
- Managed mode (`--managed llama-cpp-server|vllm`): the server is started as a child process
  (`worker/managed.py`) and this engine fronts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import httpx

from llmrelay.protocol import ErrorCode
from llmrelay.worker import managed as mg
from llmrelay.worker.engines.base import Chunk, Engine, EngineError, GenerationRequest, TokenLogprob

log = logging.getLogger("llmrelay.worker")

T = TypeVar("T")
KEY_ENV = "LLMRELAY_UPSTREAM_KEY"
# How a server that drops a connection without answering shows up.
_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def map_error(status: int, text: str, what: str = "request") -> EngineError:
    """An upstream HTTP error -> an EngineError with the FastChat code of the same meaning."""
    message, code = text.strip()[:500], ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or message)
            code = str(err.get("code") or "")
        elif isinstance(err, str):
            message = err
        if isinstance(body.get("detail"), str):  # FastAPI's shape
            message = body["detail"]
    low = message.lower()
    if code == "context_length_exceeded" or "context length" in low or "context window" in low:
        return EngineError(message, int(ErrorCode.CONTEXT_OVERFLOW))
    if status in (400, 413, 422):
        return EngineError(message or f"the upstream refused the {what} ({status})",
                           int(ErrorCode.VALIDATION_TYPE_ERROR))
    if status == 404:
        if code == "model_not_found" or "model" in low:
            return EngineError(message, int(ErrorCode.INVALID_MODEL))
        return EngineError(f"the upstream server does not serve this {what} ({message})",
                           int(ErrorCode.VALIDATION_TYPE_ERROR))
    if status == 429:  # the upstream is full or rate-limited: the API server tries another worker
        return EngineError(f"the upstream server is busy: {message}",
                           int(ErrorCode.ENGINE_OVERLOADED))
    if status in (401, 403):  # our key, not the client's: a server-side failure
        return EngineError(f"the upstream server refused this worker's key ({status}): check "
                           "--upstream-key", int(ErrorCode.INTERNAL_ERROR))
    return EngineError(f"the upstream server failed ({status}): {message}",
                       int(ErrorCode.INTERNAL_ERROR))


def request_body(req: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of the upstream request for one generation; always streamed."""
    body: dict[str, Any] = {"model": model, "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": req.temperature, "top_p": req.top_p}
    if req.max_new_tokens is not None:
        body["max_tokens"] = req.max_new_tokens
    if req.stop:
        body["stop"] = list(req.stop)
    if req.seed is not None:
        body["seed"] = req.seed
    if req.presence_penalty:
        body["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        body["frequency_penalty"] = req.frequency_penalty
    # Not OpenAI's, but vLLM and llama.cpp's server take them: sent only when asked for.
    if req.top_k not in (-1, 0):
        body["top_k"] = req.top_k
    if req.repetition_penalty != 1.0:
        body["repetition_penalty"] = req.repetition_penalty
    if req.stop_token_ids:
        body["stop_token_ids"] = list(req.stop_token_ids)
    if req.messages is not None:
        body["messages"] = req.messages
        if req.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = req.logprobs
        return "/chat/completions", body
    body["prompt"] = req.prompt_token_ids if req.prompt_token_ids is not None else req.prompt
    if req.echo:
        body["echo"] = True
    if req.logprobs is not None:
        body["logprobs"] = req.logprobs
    return "/completions", body


def chunk_logprobs(choice: dict[str, Any]) -> list[TokenLogprob]:
    """Logprobs of one streamed choice (chat's `content` list or the legacy completion shape)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return []
    out = []
    if isinstance(lp.get("content"), list):
        for e in lp["content"]:
            out.append(TokenLogprob(
                token=e.get("token", ""), logprob=float(e.get("logprob", 0.0)),
                bytes=list(e.get("bytes") or list(str(e.get("token", "")).encode())),
                top=[(t.get("token", ""), float(t.get("logprob", 0.0)))
                     for t in e.get("top_logprobs") or []]))
        return out
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    for i, tok in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        value = values[i] if i < len(values) and values[i] is not None else 0.0
        out.append(TokenLogprob(token=tok, logprob=float(value), bytes=list(tok.encode()),
                                top=[(t, float(v)) for t, v in top.items()]))
    return out


class _LoopThread:
    """An asyncio event loop in a daemon thread, for the engine's async HTTP work."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-engine",
                                       daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class OpenAIEngine(Engine):
    """Fronts one OpenAI-compatible base URL (…/v1), optionally a managed child server."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None = None,
                 model_names: list[str] | None = None, upstream_model: str | None = None,
                 context_length: int | None = None, timeout: float = 600.0,
                 check_interval: float = 2.0, server: mg.ManagedServer | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.upstream_model = upstream_model
        self.names = list(model_names or [])
        self._context = context_length
        self.check_interval = check_interval
        self.server = server
        self.upstream_models: list[dict[str, Any]] = []
        self.healthy = False
        self.last_error = "not checked yet"
        self.checked_at = 0.0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = _LoopThread()

        async def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=self.base_url, headers=headers,
                timeout=httpx.Timeout(timeout, connect=5.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

        self.client: httpx.AsyncClient = self._loop.run(make())
        self._health_task = None
        self._closed = False

    # -- health ---------------------------------------------------------------------------------
    async def _check(self) -> bool:
        try:
            r = await self.client.get("/models", timeout=5.0)
            if r.status_code != 200:
                raise map_error(r.status_code, r.text, "model list")
            data = r.json().get("data")
            if not isinstance(data, list):
                raise ValueError("no `data` list in /models")
            self.upstream_models = [m for m in data if isinstance(m, dict) and m.get("id")]
            ok, error = True, ""
        except (httpx.HTTPError, ValueError, EngineError) as e:
            ok, error = False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        self.checked_at = time.time()
        if ok != self.healthy:
            if ok:
                log.info("upstream %s is up (%s)", self.base_url,
                         ", ".join(m["id"] for m in self.upstream_models) or "no models")
            else:
                log.warning("upstream %s is down (%s): this worker reports ready=false and "
                            "refuses requests until it answers again", self.base_url, error)
        self.healthy, self.last_error = ok, error
        return ok

    async def _health_loop(self) -> None:
        while True:
            await self._check()
            await asyncio.sleep(self.check_interval)

    def check_now(self) -> bool:
        return self._loop.run(self._check(), 15)

    def start_health_checks(self) -> None:
        self.check_now()

        async def spawn() -> None:
            self._health_task = asyncio.create_task(self._health_loop())

        self._loop.run(spawn())

    def wait_upstream(self, timeout: float | None = None) -> None:
        """Block until the upstream answers /models, logging while it does not."""
        delay, started = 0.5, time.monotonic()
        while not self.check_now():
            if timeout is not None and time.monotonic() - started > timeout:
                raise EngineError(f"the upstream {self.base_url} did not answer in {timeout:.0f} s "
                                  f"({self.last_error})")
            log.warning("upstream %s not reachable (%s); retrying in %.1f s (give --model-names "
                        "to register without waiting)", self.base_url, self.last_error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def served_ids(self) -> list[str]:
        return [str(m["id"]) for m in self.upstream_models]

    def public_names(self) -> list[str]:
        return self.names or self.served_ids()

    def model_for(self, public: str | None) -> str:
        """The upstream model id for a public name."""
        ids = self.served_ids()
        if self.upstream_model:
            return self.upstream_model
        if public and public in ids:
            return public
        if ids:
            return ids[0]
        return public or (self.names[0] if self.names else "default")

    # -- the Engine interface -------------------------------------------------------------------
    def context_length(self) -> int:
        if self._context:
            return self._context
        for m in self.upstream_models:  # vLLM says it; others do not
            for key in ("max_model_len", "context_length", "context_window"):
                if isinstance(m.get(key), int):
                    return int(m[key])
        return 0

    def count_tokens(self, text: str) -> int:
        raise EngineError("token counting is not offered by this worker: its model runs in an "
                          "upstream OpenAI-compatible server", int(ErrorCode.VALIDATION_TYPE_ERROR))

    def supports_embeddings(self) -> bool:
        return True  # the upstream decides; its refusal comes back with its meaning

    def status(self) -> dict[str, Any]:
        up: dict[str, Any] = {"base_url": self.base_url, "healthy": self.healthy,
                              "models": self.served_ids(), "last_error": self.last_error or None,
                              "checked_at": self.checked_at}
        if self.server is not None:
            up["managed"] = self.server.status()
        return {"ready": self.healthy, "upstream": up}

    def _refuse_if_down(self) -> None:
        if not self.healthy:
            raise EngineError(f"the upstream server {self.base_url} is not available "
                              f"({self.last_error})", int(ErrorCode.INTERNAL_ERROR))

    def _transport_error(self, e: Exception) -> EngineError:
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
            self.healthy, self.last_error = False, type(e).__name__
            self._loop.submit(self._check())
        return EngineError(f"the upstream server {self.base_url} failed ({type(e).__name__})",
                           int(ErrorCode.INTERNAL_ERROR))

    async def _open(self, path: str, body: dict[str, Any]) -> httpx.Response:
        # No X-Request-ID: llama.cpp's server refuses ids that are not UUIDs (a bare 400).
        try:
            return await self.client.send(self.client.build_request("POST", path, json=body),
                                          stream=True)
        except _DROPPED:  # a pooled connection the server had dropped: once more, on a new one
            return await self.client.send(self.client.build_request("POST", path, json=body),
                                          stream=True)

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        path, body = request_body(req, self.model_for(req.model))
        r = await self._open(path, body)
        try:
            if r.status_code != 200:
                raise map_error(r.status_code, (await r.aread()).decode(errors="replace"),
                                "generation")
            prompt_tokens = completion_tokens = 0
            counted = 0  # text pieces seen, when the upstream gives no usage
            finish: str | None = None
            done = False
            events = 0
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    events += 1
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        continue
                    if not isinstance(obj, dict):
                        continue
                    if "error" in obj:  # an error event mid-stream
                        err = obj["error"]
                        status = int(err.get("code") or 500) if isinstance(err, dict) and str(
                            err.get("code", "")).isdigit() else 500
                        raise map_error(status, json.dumps(obj), "generation")
                    usage = obj.get("usage")
                    if isinstance(usage, dict):
                        prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
                        completion_tokens = int(usage.get("completion_tokens") or completion_tokens)
                    for choice in obj.get("choices") or []:
                        if req.messages is not None:
                            text = (choice.get("delta") or {}).get("content") or ""
                        else:
                            text = choice.get("text") or ""
                        lps = chunk_logprobs(choice)
                        if text or lps:
                            counted += 1
                            yield Chunk(text, prompt_tokens, max(completion_tokens, counted),
                                        logprobs=lps)
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
            except _DROPPED:
                if events:
                    raise
                # (an abrupt end with nothing sent: handled as an empty stream just below)
            if events or done:
                if finish is None:
                    if not done:
                        raise EngineError("the upstream server closed the stream mid-generation",
                                          int(ErrorCode.INTERNAL_ERROR))
                    finish = "stop"
                yield Chunk("", prompt_tokens, completion_tokens or counted, finish)
                return
        finally:
            await r.aclose()  # early (client gone, cancelled): closes the upstream request
        # Some servers (llama.cpp's) end a stream without a word when the request fails before
        # the first token (e.g. a prompt over the context): ask once more, unstreamed, to get
        # the error with its meaning (or, if it works this time, the answer).
        async for c in self._unstreamed(req, path, body):
            yield c

    async def _unstreamed(self, req: GenerationRequest, path: str,
                          body: dict[str, Any]) -> AsyncIterator[Chunk]:
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        r = await self._open(path, body)
        await r.aread()
        if r.status_code != 200:
            raise map_error(r.status_code, r.text, "generation")
        try:
            obj = r.json()
            choice = obj["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise EngineError(f"the upstream's reply is malformed ({e})") from e
        if req.messages is not None:
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        usage = obj.get("usage") or {}
        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        if text:
            yield Chunk(text, p, c, logprobs=chunk_logprobs(choice))
        yield Chunk("", p, c, str(choice.get("finish_reason") or "stop"))

    def generate(self, req: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        self._refuse_if_down()
        agen = self._stream(req)
        end = object()

        async def step() -> Any:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return end

        async def close() -> None:
            with contextlib.suppress(Exception):
                await agen.aclose()

        completion = prompt = 0
        fut = None
        try:
            while True:
                fut = self._loop.submit(step())
                while True:
                    if cancel.is_set():
                        yield Chunk("", prompt, completion, "abort")
                        return
                    try:
                        chunk = fut.result(0.05)
                        break
                    except FutureTimeout:
                        continue
                    except (httpx.HTTPError, OSError) as e:
                        raise self._transport_error(e) from e
                if chunk is end:
                    return
                prompt, completion = chunk.prompt_tokens, chunk.completion_tokens
                yield chunk
        finally:
            # Closing the stream closes the upstream request (the client left, or we are done):
            # a step still waiting for the upstream is cancelled, which leaves the `async with`.
            if fut is not None and not fut.done():
                fut.cancel()
            self._loop.submit(close())

    def embed(self, texts: list[Any]) -> tuple[list[list[float]], int]:
        self._refuse_if_down()

        async def call() -> httpx.Response:
            return await self.client.post("/embeddings",
                                          json={"model": self.model_for(None), "input": texts})

        try:
            r = self._loop.run(call())
        except (httpx.HTTPError, OSError) as e:
            raise self._transport_error(e) from e
        if r.status_code != 200:
            raise map_error(r.status_code, r.text, "embeddings request")
        try:
            data = sorted(r.json()["data"], key=lambda d: d.get("index", 0))
            vectors = [d["embedding"] for d in data]
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError(f"the upstream's embeddings reply is malformed ({e})") from e
        if any(v and isinstance(v[0], list) for v in vectors):
            raise EngineError(
                "the upstream returned one vector per token (its model has no pooling): start it "
                "with pooling, e.g. llama.cpp's server with `--kv_overrides "
                "llama.pooling_type=int:1` (mean)", int(ErrorCode.INTERNAL_ERROR))
        usage = r.json().get("usage") or {}
        return vectors, int(usage.get("prompt_tokens") or 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.server is not None:
            self.server.stop()
        try:
            self._loop.run(self.client.aclose(), 5)
        except Exception:  # shutting down: nothing more to do
            pass
        self._loop.stop()


def build(args: argparse.Namespace, names: list[str]) -> OpenAIEngine:
    """The engine for `--engine openai`: `--upstream URL`, or `--managed SERVER` started here."""
    key = args.upstream_key or os.environ.get(KEY_ENV)
    common = dict(upstream_model=args.upstream_model, timeout=args.upstream_timeout,
                  check_interval=args.upstream_check_interval)
    if args.managed:
        if args.upstream:
            raise EngineError("give either --upstream (a running server) or --managed (a server "
                              "this worker starts), not both")
        return _build_managed(args, names, key, common)
    if not args.upstream:
        raise EngineError("--engine openai needs --upstream http://HOST:PORT/v1 (a running "
                          "OpenAI-compatible server) or --managed llama-cpp-server|vllm")
    engine = OpenAIEngine(args.upstream, key, names, context_length=args.context_length,
                          **common)  # type: ignore[arg-type]
    if names:
        engine.check_now()  # start order does not matter: it may come up later
    else:
        engine.wait_upstream()  # its model list gives the names
        if not engine.served_ids():
            raise EngineError(f"the upstream {args.upstream} serves no models; give --model-names")
    engine.start_health_checks()
    return engine


def _build_managed(args: argparse.Namespace, names: list[str], key: str | None,
                   common: dict[str, Any]) -> OpenAIEngine:
    from llmrelay.worker.models import ModelNotFound, resolve

    model_path = args.model_path
    default_name = Path(model_path.rstrip("/")).name or "model"
    try:
        found = resolve(model_path)
        model_path, default_name = str(found.path), found.default_name
        if args.managed == "llama-cpp-server" and found.kind != "gguf":
            raise EngineError(f"llama.cpp's server needs a .gguf file; {found.path} is an HF "
                              "folder (serve it with --managed vllm or the transformers engine)")
    except ModelNotFound:
        if args.managed == "llama-cpp-server":
            raise
        # vLLM loads hub ids and folders itself; a path that does not exist is its to refuse.
    names = names or [default_name]
    port = args.managed_port or mg.free_port()
    opts = mg.options_from_args(args, model_path, names, port)
    if args.managed == "vllm":
        argv = mg.vllm_argv(opts, mg.find_vllm())
        if args.max_gpu_memory:
            log.warning("--max-gpu-memory is not honoured by vLLM; use --gpu-memory-utilization")
    else:
        argv = mg.llamacpp_server_argv(opts)
        if args.gpu_memory_utilization is not None or args.tensor_parallel_size:
            log.warning("--gpu-memory-utilization/--tensor-parallel-size are vLLM flags; "
                        "llama.cpp's server ignores them")
    base = f"http://127.0.0.1:{port}/v1"
    server = mg.ManagedServer(args.managed, argv, base)
    server.start()
    try:
        server.wait_ready(args.managed_start_timeout)
    except mg.ManagedError as e:
        raise EngineError(str(e)) from e
    engine = OpenAIEngine(base, key, names, upstream_model=args.upstream_model or names[0],
                          context_length=args.context_length, timeout=args.upstream_timeout,
                          check_interval=args.upstream_check_interval, server=server)
    server.on_exit = lambda code: engine._loop.submit(engine._check())
    engine.start_health_checks()
    return engine
