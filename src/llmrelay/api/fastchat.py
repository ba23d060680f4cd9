"""Talking to FastChat's own workers (those that announce none of our protocol extensions).

A FastChat worker takes a rendered `prompt`, not chat `messages`, answers with cumulative
`text` in each frame, and left-truncates a prompt that does not leave room for
`max_new_tokens`. So, for such a worker, the API server does what FastChat's API server does:
it fetches the worker's conversation template (`/worker_get_conv_template`) and context length
(`/model_details`) once per worker registration, renders the messages with the template
(`llmrelay.fastchat_conv`), counts the prompt's tokens on the worker (`/count_token`) to clamp
`max_new_tokens`, adds the template's stop strings and stop token ids, and turns the cumulative
frames back into deltas (`CumulativeToDelta`).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from llmrelay.api.errors import APIError
from llmrelay.api.table import Worker
from llmrelay.fastchat_conv import Conversation, ConvTemplateError
from llmrelay.protocol import from_legacy

log = logging.getLogger("llmrelay.api")

# The generation params FastChat's workers read (anything else is left out).
_FASTCHAT_KEYS = ("model", "temperature", "top_p", "top_k", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "logprobs")


class WorkerUnsuitable(Exception):
    """This worker cannot serve this request (another worker of the model may)."""


class FastChatAdapter:
    """Speaks to FastChat's workers for the transport: their template and context are fetched
    once per (worker, model, registration) with the side-question client it is given."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self._cache: dict[tuple[str, str], tuple[float, Conversation, int]] = {}

    async def body_for(self, worker: Worker, ours: dict[str, Any]) -> dict[str, Any]:
        """The body for whichever worker was picked: ours as they are, FastChat's translated.
        WorkerUnsuitable if this worker cannot take the request (another may)."""
        if worker.speaks_ours:
            if ours.get("prompt_token_ids") is not None and not worker.takes_token_ids:
                raise WorkerUnsuitable(f"{worker.name} does not take token-id prompts")
            return ours
        return await self.params(worker, ours)

    async def info(self, worker: Worker, model: str) -> tuple[Conversation, int]:
        """The worker's conversation template and context length."""
        key = (worker.name, model)
        hit = self._cache.get(key)
        if hit and hit[0] == worker.registered_at:
            return hit[1], hit[2]
        r = await self.client.post(worker.name + "/worker_get_conv_template",
                                   json={"model": model}, timeout=10.0)
        r.raise_for_status()
        try:
            conv = Conversation.from_wire(r.json().get("conv"))
        except (ConvTemplateError, ValueError, AttributeError) as e:
            raise APIError(500, f"The model worker {worker.name} sent a conversation template "
                           f"this server cannot use: {e}", type="server_error") from e
        r = await self.client.post(worker.name + "/model_details", json={"model": model},
                                   timeout=10.0)
        r.raise_for_status()
        context = int(r.json().get("context_length") or 2048)
        log.info("FastChat worker %s: conversation template %r (%s), context %d", worker.name,
                 conv.name, conv.sep_style, context)
        self._cache[key] = (worker.registered_at, conv, context)
        return conv, context

    async def count(self, worker: Worker, model: str, prompt: str) -> int:
        """The prompt's tokens, counted by the worker."""
        r = await self.client.post(worker.name + "/count_token",
                                   json={"model": model, "prompt": prompt}, timeout=30.0)
        r.raise_for_status()
        data = r.json()
        if data.get("error_code"):
            raise WorkerUnsuitable(f"{worker.name} could not count tokens: {data.get('text')}")
        return int(data["count"])

    async def rendered(self, worker: Worker, model: str, messages: list[dict[str, Any]]) -> str:
        """Chat messages as the prompt the worker's conversation template makes of them (no
        images: admission routes a request with images only to workers with `vision`)."""
        if any(not isinstance(m.get("content"), str | None) for m in messages):
            raise APIError(400, f"The model '{model}' takes no images (a FastChat worker serves "
                           "it).", param="messages", code="model_takes_no_images")
        conv, _ = await self.info(worker, model)
        try:
            return conv.render(messages)
        except ConvTemplateError as e:
            raise APIError(400, str(e), param="messages") from e

    async def params(self, worker: Worker, ours: dict[str, Any]) -> dict[str, Any]:
        """FastChat worker params for one choice, from the params we would send our own
        workers. `ours["messages"]` (chat) are rendered with the worker's template, whose stop
        strings and stop token ids are added; otherwise `ours["prompt"]` is sent as it is
        (completions)."""
        model = str(ours["model"])
        conv, context = await self.info(worker, model)
        stop = [ours["stop"]] if isinstance(ours.get("stop"), str) else list(ours.get("stop") or [])
        stop_ids: list[int] | None = None
        messages = ours.get("messages")
        if messages is not None:
            prompt = await self.rendered(worker, model, messages)
            stop = conv.stops(stop)
            stop_ids = conv.stop_token_ids or None
        elif isinstance(ours.get("prompt"), str):
            prompt = ours["prompt"]
        else:
            raise WorkerUnsuitable(f"{worker.name} is a FastChat worker: it takes text prompts, "
                                   "not token ids")
        n_prompt = await self.count(worker, model, prompt)
        room = context - n_prompt
        if room <= 0:
            raise APIError(
                400, f"This model's maximum context length is {context} tokens. However, your "
                f"messages resulted in {n_prompt} tokens. Please reduce the length of the "
                "messages.", param="messages" if messages is not None else "prompt",
                code="context_length_exceeded")
        wanted = ours.get("max_new_tokens")
        out = {k: ours[k] for k in _FASTCHAT_KEYS if ours.get(k) is not None}
        out.update(
            prompt=prompt,
            # A FastChat worker cuts the prompt's start to make room; never let it.
            max_new_tokens=room if wanted is None else min(int(wanted), room),
            echo=bool(ours.get("echo", False)),
            stop=stop,
            stop_token_ids=stop_ids,
        )
        return out


class CumulativeToDelta:
    """FastChat frames (cumulative `text` and logprobs) -> our delta frames.

    Like FastChat's API server, a trailing U+FFFD (half a UTF-8 character) is held back until
    the character is complete.
    """

    def __init__(self) -> None:
        self.text = ""
        self.n_logprobs = 0

    def __call__(self, frame: dict[str, Any]) -> dict[str, Any]:
        if frame.get("error_code"):
            return frame
        full = str(frame.get("text") or "")
        if frame.get("finish_reason") is None:
            full = full.rstrip("\ufffd")
        # What is past the text sent so far; when the worker revised earlier text (a character
        # completed) that is only what is new, and nothing when its text got shorter.
        delta = full[len(self.text):]
        if len(full) >= len(self.text):
            self.text = full
        out = dict(frame, text=delta)
        lp = frame.get("logprobs")
        if isinstance(lp, dict) and "tokens" in lp:
            entries, offsets = from_legacy(lp, self.n_logprobs)
            logprobs: dict[str, Any] | None = None
            if entries:
                logprobs = {"content": entries}
                if offsets is not None:
                    logprobs["text_offset"] = offsets
            out["logprobs"] = logprobs
            self.n_logprobs = len(lp.get("tokens") or [])
        return out
