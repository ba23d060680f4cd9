"""Text completions: prompts in any of OpenAI's four forms (a string, strings, token ids, lists
of token ids) -> one generation per prompt and choice -> OpenAI's completion objects and chunks,
with logprobs in the legacy parallel lists.

`CompletionServing.create` is the whole endpoint with plain arguments; `response` and `chunks`
shape frames alone, so tests can feed them frames without a server or a worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from llmrelay.api.completions.protocol import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionWithUsage,
)
from llmrelay.api.errors import bad_param
from llmrelay.api.frames import Delta
from llmrelay.api.pipeline import (
    Frames,
    GenerationServing,
    Streamed,
    finish_reason,
    openai_usage,
    usage_of,
)
from llmrelay.api.plan import Caller, Plan, Prompt
from llmrelay.api.protocol import sampling_of
from llmrelay.api.tools import Constraints, logit_bias
from llmrelay.protocol import LegacyLogprobs, text_offsets, to_legacy


def prompts_of(prompt: Any) -> list[Prompt]:
    """A prompt in any of OpenAI's four forms -> the prompts (a text, or token ids) to answer."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise bad_param("prompt", "prompt must be a string, a list of strings, or token ids, "
                    "and must not be empty.")


def whole_logprobs(final: Delta) -> LegacyLogprobs:
    """A whole answer's logprobs in the legacy lists, with the worker's text offsets (an
    echoed prompt has no entries, so the answer's tokens do not start at 0), else counted
    from 0."""
    entries = final.logprobs or []
    offsets = text_offsets(entries, 0)
    worker_offsets = final.text_offset
    if worker_offsets:
        offsets[:len(worker_offsets)] = worker_offsets[:len(offsets)]
    return to_legacy(entries, offsets)


def to_plan(body: CompletionRequest, request_id: str, caller: Caller | None) -> Plan:
    """A completions request as the pipeline's plan (400s for what it cannot be)."""
    if body.suffix:
        raise bad_param("suffix", "suffix (insertion) is not supported.",
                        "unsupported_parameter")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise bad_param("best_of", "best_of must equal n (no server-side ranking).",
                        "unsupported_value")
    prompts = prompts_of(body.prompt)
    return Plan(model=body.model, request_id=request_id, sampling=sampling_of(
        body, max_new_tokens=16 if body.max_tokens is None else body.max_tokens,
        logprobs=body.logprobs), prompts=prompts, n=n, echo=bool(body.echo),
        constraints=Constraints(logit_bias=logit_bias(body.logit_bias)), caller=caller)


class CompletionServing(GenerationServing):
    async def create(self, body: CompletionRequest, request_id: str, receive: Receive,
                     caller: Caller | None = None) -> CompletionWithUsage | Streamed:
        """The answer to one request of `caller` (None: a server without API keys): whole, or
        `Streamed` (see pipeline.respond)."""
        plan = await self.admit(body, lambda: to_plan(body, request_id, caller))
        n = plan.n
        id_, created = f"cmpl-{request_id}", int(self.clock())
        logprobs = body.logprobs is not None

        if not body.stream:
            finals = await self.pipeline.answer_all(receive, plan)
            return self.response(id_, created, body.model, n, finals, logprobs)

        opening = self.pipeline.opening(receive, plan)
        await opening.wait_briefly()
        include_usage = body.include_usage
        return Streamed(lambda: self.chunks(id_, created, body.model, n, plan.choices,
                                            opening.frames(), logprobs, include_usage), opening)

    @staticmethod
    def response(id_: str, created: int, model: str, n: int, finals: list[Delta],
                 logprobs: bool) -> CompletionWithUsage:
        """A whole answer from each choice's whole Delta (n choices per prompt)."""
        return CompletionWithUsage(id=id_, created=created, model=model, choices=[
            CompletionChoice(index=i, text=f.text,
                             logprobs=whole_logprobs(f) if logprobs else None,
                             finish_reason=finish_reason(f.finish_reason))
            for i, f in enumerate(finals)], usage=openai_usage(usage_of(dict(enumerate(finals)),
                                                                        lambda i: i // n)))

    @staticmethod
    async def chunks(id_: str, created: int, model: str, n: int, total: int,
                     frames: AsyncIterator[Frames], logprobs: bool, include_usage: bool
                     ) -> AsyncIterator[list[Completion]]:
        """Chunks from the choices' merged delta frames (`total` choices, n per prompt), a list
        per batch of frames."""
        last: dict[int, Delta] = {}
        offsets = [0] * total  # where each choice's next text starts
        async for batch in frames:
            out: list[Completion] = []
            for i, f in batch:
                last[i] = f
                text = f.text
                lp = None
                if logprobs and f.logprobs is not None:
                    lp = to_legacy(f.logprobs, text_offsets(f.logprobs, offsets[i]))
                offsets[i] += len(text)
                reason = f.finish_reason
                if text or lp or reason:
                    out.append(Completion(id=id_, created=created, model=model, choices=[
                        CompletionChoice(index=i, text=text, logprobs=lp,
                                         finish_reason=finish_reason(reason) if reason else None)]))
            yield out
        usage = usage_of(last, lambda i: i // n)  # charged to the API key even when not sent
        if include_usage:
            yield [CompletionWithUsage(id=id_, created=created, model=model, choices=[],
                                       usage=openai_usage(usage))]
