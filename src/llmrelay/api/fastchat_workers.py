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
from typing import TYPE_CHECKING, Any

from llmrelay.api.errors import APIError
from llmrelay.fastchat_conv import Conversation, ConvTemplateError
from llmrelay.protocol import EXT_DELTA, EXT_MESSAGES, EXT_TOKEN_IDS

if TYPE_CHECKING:
    from llmrelay.api.routing import Worker, WorkerTable

log = logging.getLogger("llmrelay.api")

# The generation params FastChat's workers read (anything else is left out).
_FASTCHAT_KEYS = ("model", "temperature", "top_p", "top_k", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "logprobs")


class WorkerUnsuitable(Exception):
    """This worker cannot serve this request (another worker of the model may)."""


def speaks_ours(worker: Worker) -> bool:
    """Whether the worker takes our chat `messages` and delta frames."""
    return {EXT_MESSAGES, EXT_DELTA} <= worker.extensions


class FastChatInfo:
    """What a FastChat worker told us about itself, cached per (worker, model, registration)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[float, Conversation, int]] = {}

    async def get(self, table: WorkerTable, worker: Worker, model: str) -> tuple[Conversation, int]:
        key = (worker.name, model)
        hit = self._cache.get(key)
        if hit and hit[0] == worker.registered_at:
            return hit[1], hit[2]
        r = await table.client.post(worker.name + "/worker_get_conv_template",
                                    json={"model": model}, timeout=10.0)
        r.raise_for_status()
        try:
            conv = Conversation.from_wire(r.json().get("conv"))
        except (ConvTemplateError, ValueError, AttributeError) as e:
            raise APIError(500, f"The model worker {worker.name} sent a conversation template "
                           f"this server cannot use: {e}", type="server_error") from e
        r = await table.client.post(worker.name + "/model_details", json={"model": model},
                                    timeout=10.0)
        r.raise_for_status()
        context = int(r.json().get("context_length") or 2048)
        log.info("FastChat worker %s: conversation template %r (%s), context %d", worker.name,
                 conv.name, conv.sep_style, context)
        self._cache[key] = (worker.registered_at, conv, context)
        return conv, context


async def _count(table: WorkerTable, worker: Worker, model: str, prompt: str) -> int:
    r = await table.client.post(worker.name + "/count_token",
                                json={"model": model, "prompt": prompt}, timeout=30.0)
    r.raise_for_status()
    data = r.json()
    if data.get("error_code"):
        raise WorkerUnsuitable(f"{worker.name} could not count tokens: {data.get('text')}")
    return int(data["count"])


async def fastchat_params(table: WorkerTable, worker: Worker, ours: dict[str, Any]
                          ) -> dict[str, Any]:
    """FastChat worker params for one choice, from the params we would send our own workers.

    `ours["messages"]` (chat) are rendered with the worker's template, whose stop strings and stop
    token ids are added; otherwise `ours["prompt"]` is sent as it is (completions).
    """
    model = str(ours["model"])
    conv, context = await table.fastchat_info.get(table, worker, model)
    stop = [ours["stop"]] if isinstance(ours.get("stop"), str) else list(ours.get("stop") or [])
    stop_ids: list[int] | None = None
    messages = ours.get("messages")
    if messages is not None:
        try:
            prompt = conv.render(messages)
        except ConvTemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        stop = conv.stops(stop)
        stop_ids = conv.stop_token_ids or None
    elif isinstance(ours.get("prompt"), str):
        prompt = ours["prompt"]
    else:
        raise WorkerUnsuitable(f"{worker.name} is a FastChat worker: it takes text prompts, "
                               "not token ids")
    n_prompt = await _count(table, worker, model, prompt)
    room = context - n_prompt
    if room <= 0:
        raise APIError(
            400, f"This model's maximum context length is {context} tokens. However, your "
            f"messages resulted in {n_prompt} tokens. Please reduce the length of the messages.",
            param="messages" if messages is not None else "prompt",
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


def param_builder(table: WorkerTable, ours: dict[str, Any]) -> Any:
    """The params for whichever worker is picked: ours as they are, FastChat's translated."""

    async def build(worker: Worker) -> dict[str, Any]:
        if speaks_ours(worker):
            if ours.get("prompt_token_ids") is not None and EXT_TOKEN_IDS not in worker.extensions:
                raise WorkerUnsuitable(f"{worker.name} does not take token-id prompts")
            return ours
        return await fastchat_params(table, worker, ours)

    return build


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
        if full.startswith(self.text):
            delta = full[len(self.text):]
        else:  # the worker revised earlier text (a completed character): send what is new
            delta = full[len(self.text):] if len(full) > len(self.text) else ""
        if len(full) >= len(self.text):
            self.text = full
        out = dict(frame, text=delta)
        lp = frame.get("logprobs")
        if isinstance(lp, dict) and "tokens" in lp:
            tokens = lp.get("tokens") or []
            values = lp.get("token_logprobs") or []
            new = []
            for i in range(self.n_logprobs, len(tokens)):
                v = values[i] if i < len(values) else None
                new.append({"token": tokens[i], "logprob": v if v is not None else 0.0,
                            "bytes": list(str(tokens[i]).encode()), "top_logprobs": []})
            out["logprobs"] = None
            if new:
                out["logprobs"] = {"content": new}
                offsets = lp.get("text_offset")
                if isinstance(offsets, list) and len(offsets) == len(tokens):
                    out["logprobs"]["text_offset"] = offsets[self.n_logprobs:]
            self.n_logprobs = len(tokens)
        return out
