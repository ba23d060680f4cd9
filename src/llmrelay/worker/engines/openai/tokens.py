"""Token counts the upstream's way, for when its answers do not say them.

Usage is first asked of the stream itself (`stream_options.include_usage`: vLLM, llama.cpp's
server, Ollama, OpenAI and llmrelay send it on the last chunk). llama-cpp-python's server sends
none in streams; then:

- completion tokens are the pieces streamed (its server streams one piece per token; with
  logprobs, the entries),
- prompt tokens of a token-id prompt are its length; of a text prompt, the upstream's tokenize
  endpoint's count (below),
- prompt tokens of chat messages are the upstream's own figure: the rendered prompt is only known
  to the upstream (its chat template), and llama-cpp-python's tokenize endpoint takes text, not
  messages, so the same messages are sent once more, unstreamed with `max_tokens: 1`, and its
  `usage.prompt_tokens` is read (the upstream's prompt cache makes that one token cheap). Also
  the way for a text prompt when the upstream has no tokenize endpoint.
- if even that fails (the upstream failed meanwhile), the count is 0 and the worker's log says
  why.

Tokenize endpoints, at the server's root (not under /v1), found on first use:
`POST /tokenize` (vLLM: `{"model", "prompt"}` -> `{"count", "tokens"}`; llama.cpp's server:
`{"content", "add_special"}` -> `{"tokens"}`; one body serves both) and `POST /extras/tokenize`
(llama-cpp-python: `{"model", "input"}` -> `{"tokens"}`). Each counts the text as a completion
prompt (with the model's BOS token where it has one). The same endpoints give the worker's
`/tokenize` its token ids; `/detokenize` goes to `POST /detokenize` (vLLM: `{"model", "tokens"}`
-> `{"prompt"}`; llama.cpp's server: -> `{"content"}`) or `POST /extras/detokenize`
(llama-cpp-python: -> `{"text"}`), found the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import openai

from llmrelay.worker.engines.openai.calls import Call, usage_of
from llmrelay.worker.engines.openai.errors import describe, once_more_if_dropped

log = logging.getLogger("llmrelay.worker")

T = TypeVar("T")
TIMEOUT = 10.0
TOKENIZERS: list[tuple[str, Callable[[str, str], dict[str, Any]]]] = [
    ("/tokenize", lambda text, model: {"model": model, "prompt": text, "content": text,
                                       "add_special": True}),
    ("/extras/tokenize", lambda text, model: {"model": model, "input": text}),
]
DETOKENIZERS: list[tuple[str, Callable[[list[int], str], dict[str, Any]]]] = [
    ("/detokenize", lambda tokens, model: {"model": model, "tokens": tokens}),
    ("/extras/detokenize", lambda tokens, model: {"model": model, "tokens": tokens}),
]
NOT_THERE = (404, 405)  # a server without this endpoint


def server_root(base_url: str) -> str:
    """http://host:port for http://host:port/v1 (tokenize endpoints are not under /v1)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def count_of(answer: Any) -> int:
    """A tokenize endpoint's answer -> the count; ValueError if it says none."""
    if isinstance(answer, dict):
        if isinstance(answer.get("count"), int):
            return int(answer["count"])
        if isinstance(answer.get("tokens"), list):
            return len(answer["tokens"])
    raise ValueError(f"a tokenize answer without `count` or `tokens`: {str(answer)[:100]}")


def ids_of(answer: Any) -> list[int]:
    """A tokenize endpoint's answer -> the token ids (llama.cpp's server may send each as
    `{"id", "piece"}`); ValueError if it has none."""
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        raise ValueError(f"a tokenize answer without `tokens`: {str(answer)[:100]}")
    out = [t.get("id") if isinstance(t, dict) else t for t in tokens]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in out):
        raise ValueError(f"a tokenize answer with tokens that are not ids: {str(tokens)[:100]}")
    return out  # type: ignore[return-value]


def text_of(answer: Any) -> str:
    """A detokenize endpoint's answer -> the text; ValueError if it has none."""
    if isinstance(answer, dict):
        for key in ("prompt", "content", "text"):
            if isinstance(answer.get(key), str):
                return str(answer[key])
    raise ValueError(f"a detokenize answer without text: {str(answer)[:100]}")


def _tokenized(answer: Any) -> Any:
    """A tokenize endpoint's answer as it is, once it is one (ValueError if not)."""
    count_of(answer)
    return answer


class Endpoint(Generic[T]):
    """One of several endpoints an upstream may have for a job, found on first use."""

    def __init__(self, client: openai.AsyncOpenAI, root: str,
                 candidates: list[tuple[str, Callable[[Any, str], dict[str, Any]]]],
                 read: Callable[[Any], T]) -> None:
        self.client = client
        self.root = root
        self.candidates = candidates
        self.read = read
        self.found: int | None = None  # index in candidates, once found
        self.looked = False  # every one answered 404: there is none

    async def _post(self, i: int, arg: Any, model: str) -> T:
        path, body = self.candidates[i]
        answer = await once_more_if_dropped(lambda: self.client.post(
            self.root + path, cast_to=object, body=body(arg, model), options={"timeout": TIMEOUT}))
        return self.read(answer)

    async def ask(self, arg: Any, model: str) -> T | None:
        """The upstream's answer, read; None if it has no such endpoint. Raises the SDK's
        errors other than "not there" (a down upstream is not a missing endpoint)."""
        if self.found is not None:
            return await self._post(self.found, arg, model)
        if self.looked:
            return None
        for i, (path, _) in enumerate(self.candidates):
            try:
                out = await self._post(i, arg, model)
            except openai.APIStatusError as e:
                if e.status_code in NOT_THERE:
                    continue
                raise
            except ValueError:  # answers, but not as this endpoint
                continue
            self.found = i
            log.info("upstream %s: %s", self.root, path)
            return out
        self.looked = True
        log.info("upstream %s has none of %s", self.root,
                 ", ".join(p for p, _ in self.candidates))
        return None


class Counter:
    """Counts tokens through the upstream: its tokenize endpoint, else a one-token answer."""

    def __init__(self, client: openai.AsyncOpenAI, base_url: str) -> None:
        self.client = client
        self.root = server_root(base_url)
        self.tokenizer: Endpoint[Any] = Endpoint(client, self.root, TOKENIZERS, _tokenized)
        self.detokenizer: Endpoint[str] = Endpoint(client, self.root, DETOKENIZERS, text_of)

    async def count_text(self, text: str, model: str) -> int | None:
        """Tokens in `text` by the upstream's tokenize endpoint; None if it has none. Raises the
        SDK's errors other than "not there" (a down upstream is not a missing endpoint)."""
        answer = await self.tokenizer.ask(text, model)
        return None if answer is None else count_of(answer)

    async def ids(self, text: str, model: str) -> list[int] | None:
        """The token ids of `text` by the upstream's tokenize endpoint; None if it has none."""
        answer = await self.tokenizer.ask(text, model)
        return None if answer is None else ids_of(answer)

    async def text(self, tokens: list[int], model: str) -> str | None:
        """The text of token ids by the upstream's detokenize endpoint; None if it has none."""
        return await self.detokenizer.ask(tokens, model)

    async def prompt_tokens(self, call: Call) -> int:
        """The prompt tokens of a generation whose answer did not say them (see above)."""
        prompt = call.args.get("prompt")
        model = str(call.args["model"])
        try:
            if isinstance(prompt, list):
                return len(prompt)
            if isinstance(prompt, str):
                n = await self.count_text(prompt, model)
                if n is not None:
                    return n
            return await self._one_token(call)
        except (openai.APIError, ValueError) as e:
            log.warning("cannot count the prompt tokens at upstream %s (%s): reporting 0",
                        self.root, describe(e))
            return 0

    async def chat_prompt_tokens(self, call: Call) -> int:
        """The prompt tokens of a chat call: the upstream's own figure, from a one-token
        answer (ValueError if that has none)."""
        return await self._one_token(call)

    async def _one_token(self, call: Call) -> int:
        quiet = {k: v for k, v in call.args.items() if k not in ("logprobs", "top_logprobs", "echo")}
        args = Call(call.chat, quiet, call.extra_body).whole(max_tokens=1)
        api = self.client.chat.completions if call.chat else self.client.completions
        answer = await once_more_if_dropped(lambda: api.create(**args))
        counted = usage_of(answer)
        if not counted or counted[0] <= 0:
            raise ValueError("its one-token answer has no usage either")
        return counted[0]
