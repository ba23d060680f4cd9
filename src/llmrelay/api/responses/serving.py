"""The Responses API's endpoints with plain arguments: create (whole or streamed), compact,
retrieve, delete and list input items, over the shared pipeline and a `ResponseStore`.

A request becomes the pipeline's one internal request, a Plan (plan.py): the stored conversation of
`previous_response_id` (its input items and output, tool calls and their outputs included),
then the request's own items, after `instructions` as a system message (instructions are not
carried over from earlier responses, as OpenAI does); `tools`, `tool_choice` and `text.format`
become api/tools.py's `Constraints`. The answer comes back as the Response object, or as its
event stream (events.py). With `store` (the default) the Response and the conversation it
answered are kept under the caller's key (`owner`: the hash of the API key, "" without keys).
`compact` summarises a conversation into a compaction item (compact.py)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from llmrelay.api.errors import APIError, bad_param
from llmrelay.api.keys import digest
from llmrelay.api.pipeline import GenerationServing, Opening, Pipeline, SSEFormat, Streamed
from llmrelay.api.plan import Caller, Plan, Sampling
from llmrelay.api.responses.compact import (
    INSTRUCTION,
    MAX_SUMMARY_TOKENS,
    CompactRequest,
    CompactResource,
    compacted,
)
from llmrelay.api.responses.events import (
    Event,
    EventWriter,
    encode,
    finish,
    usage,
)
from llmrelay.api.responses.items import input_items, output_items, to_messages
from llmrelay.api.responses.protocol import Response, ResponsesRequest, new_id
from llmrelay.api.responses.store import ResponseStore, StoredResponse
from llmrelay.api.table import WorkerTable
from llmrelay.protocol import dumps, loads

log = logging.getLogger("llmrelay.api")

MAX_LIST = 100


def owner_of(authorization: str, keyed: bool) -> str:
    """Whose responses a request reads and writes: the SHA-256 of its API key (never the key
    itself), or "" on a server without keys (where any client may read any response).
    `authorization`: the request's key as auth.authorization gives it (x-api-key included)."""
    if not keyed:
        return ""
    scheme, _, token = authorization.partition(" ")
    secret = token.strip() if scheme.lower() == "bearer" else ""
    if not secret:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer "
                       "YOUR_KEY'.", code="invalid_api_key")
    return digest(secret)


def not_found(response_id: str, param: str = "response_id") -> APIError:
    return APIError(404, f"Response with id '{response_id[:100]}' not found.", param=param,
                    code="not_found")


def plain(obj: Any) -> Any:
    """A Response (dataclasses) as the JSON it is stored as."""
    return loads(dumps(obj))


# Responses' events, each with its `event:` line; no [DONE] (errors end in response.failed).
RESPONSES_SSE = SSEFormat(chunk=encode, done=b"")


@dataclass
class ResponseEnds:
    """A streamed Response's own events around its chunks (pipeline.StreamEnds): created and
    in_progress first; on a failure, response.failed, once the failed Response is stored."""

    serving: ResponsesServing
    writer: EventWriter
    owner: str
    conversation: list[dict[str, Any]]

    def start(self) -> list[Any]:
        return list(self.writer.start())

    async def failed(self, e: APIError) -> list[Any]:
        last = self.writer.fail(e)
        await self.serving.save(self.owner, self.writer.final, self.conversation)
        return list(last)


class ResponsesServing(GenerationServing):
    def __init__(self, table: WorkerTable, pipeline: Pipeline, store: ResponseStore,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(table, pipeline, clock)
        self.store = store

    async def _conversation(self, owner: str, body: ResponsesRequest | CompactRequest,
                            items: list[dict[str, Any]], what: str
                            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the conversation so far: the stored one of previous_response_id, then `items`;
        the chat messages to answer, after the instructions); 400 when none is to `what`."""
        history = await self._history(owner, body.previous_response_id)
        conversation = history + items
        messages = to_messages(body.instructions, conversation, first_new=len(history))
        if not any(m["role"] != "system" for m in messages):
            raise bad_param("input", f"input holds no message to {what}.")
        return conversation, messages

    # ---- POST /v1/responses -------------------------------------------------------------------

    async def create(self, body: ResponsesRequest, request_id: str, owner: str,
                     receive: Any, caller: Caller | None = None) -> Response | Streamed:
        """The answer to one request of `caller` (None: a server without API keys): the
        Response object, or its event stream."""
        conversation: list[dict[str, Any]] = []

        async def to_plan() -> Plan:
            nonlocal conversation
            constraints = body.constraints()
            conversation, messages = await self._conversation(owner, body,
                                                              input_items(body.input), "answer")
            return Plan(model=body.model, request_id=request_id, sampling=Sampling.of(
                temperature=body.temperature, top_p=body.top_p,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                max_new_tokens=body.max_output_tokens), messages=messages,
                constraints=constraints, caller=caller, reasoning=body.reasoning_settings())

        plan = await self.admit(body, to_plan)
        constraints = plan.constraints
        head = Response(
            id=new_id("resp"), created_at=int(self.clock()), instructions=body.instructions,
            max_output_tokens=body.max_output_tokens, model=body.model,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id, store=body.store is not False,
            temperature=plan.sampling.temperature, text=body.echo_text(),
            tool_choice=body.echo_tool_choice(), tools=body.echo_tools(constraints.tools),
            top_p=plan.sampling.top_p, presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0, user=body.user,
            metadata=body.metadata or {}, reasoning=body.echo_reasoning(),
            safety_identifier=body.echo_ignored("safety_identifier"),
            prompt_cache_key=body.echo_ignored("prompt_cache_key"))

        if not body.stream:
            final = (await self.pipeline.answer_all(receive, plan))[0]
            cut = final.finish_reason == "length"
            response = finish(head, output_items(final, cut), final, self.clock)
            await self.save(owner, response, conversation)
            return response

        opening = self.pipeline.opening(receive, plan)
        await opening.wait_briefly()
        writer = EventWriter(head, self.clock)
        return Streamed(lambda: self.events(writer, opening, owner, conversation), opening,
                        RESPONSES_SSE, ResponseEnds(self, writer, owner, conversation))

    async def events(self, writer: EventWriter, opening: Opening, owner: str,
                     conversation: list[dict[str, Any]]) -> AsyncIterator[list[Event]]:
        """The stream's events after its start, a list per write, until the Response is done
        (stored before its last events leave); the pipeline's stream writes them, with the
        keep-alives while workers are awaited and response.failed on an error (ResponseEnds)."""
        async with contextlib.aclosing(opening.frames()) as frames:  # stops the workers
            async for batch in frames:
                events = writer.feed(batch)
                if events:
                    yield list(events)
        last = writer.finish()
        await self.save(owner, writer.final, conversation)
        yield list(last)

    async def _history(self, owner: str, previous_response_id: str | None
                       ) -> list[dict[str, Any]]:
        """The stored conversation a request continues: its items and output."""
        if not previous_response_id:
            return []
        prev = await self.store.get(owner, previous_response_id)
        if prev is None:
            raise not_found(previous_response_id, "previous_response_id")
        return prev.input_items + prev.response.get("output", [])

    # ---- POST /v1/responses/compact -----------------------------------------------------------

    async def compact(self, body: CompactRequest, request_id: str, owner: str,
                      receive: Any, caller: Caller | None = None) -> CompactResource:
        """The conversation compacted: its user, system and developer messages, then a
        compaction item with the model's summary of it (compact.py)."""
        conversation: list[dict[str, Any]] = []

        async def to_plan() -> Plan:
            nonlocal conversation
            items = input_items(body.input) if body.input is not None else []
            conversation, messages = await self._conversation(owner, body, items, "compact")
            return Plan(model=body.model, request_id=request_id,
                        sampling=Sampling.of(temperature=0.0, max_new_tokens=MAX_SUMMARY_TOKENS),
                        messages=messages + [{"role": "user", "content": INSTRUCTION}],
                        caller=caller)

        final = (await self.pipeline.answer_all(receive, await self.admit(body, to_plan)))[0]
        return CompactResource(id=new_id("resp"), created_at=int(self.clock()),
                               output=compacted(conversation, final.text.strip()),
                               usage=usage(final))

    async def save(self, owner: str, response: Response | None,
                   conversation: list[dict[str, Any]]) -> None:
        """Keep `response` (and the conversation it answered) when it asked to be stored."""
        if response is None or not response.store:
            return
        try:
            await self.store.put(StoredResponse(response.id, owner, float(response.created_at),
                                                plain(response), conversation))
        except Exception:  # the answer still goes out; it cannot be continued or read back
            log.exception("could not store response %s", response.id)

    # ---- GET / DELETE /v1/responses/{id}, GET .../input_items ---------------------------------

    async def _stored(self, owner: str, response_id: str) -> StoredResponse:
        rec = await self.store.get(owner, response_id)
        if rec is None:
            raise not_found(response_id)
        return rec

    async def retrieve(self, owner: str, response_id: str, include: list[str] | None = None,
                       stream: str | None = None) -> dict[str, Any]:
        _refuse_include(include)
        if stream not in (None, "", "false", "False", "0"):
            raise bad_param("stream", "Replaying a stored response as events is not supported; "
                            "retrieve it without stream.", "unsupported_value")
        return (await self._stored(owner, response_id)).response

    async def delete(self, owner: str, response_id: str) -> dict[str, Any]:
        if not await self.store.delete(owner, response_id):
            raise not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def input_items(self, owner: str, response_id: str, after: str | None = None,
                          limit: str | int | None = None, order: str | None = None,
                          include: list[str] | None = None) -> dict[str, Any]:
        """The items the response answered (its conversation so far), a page at a time:
        `order` desc (newest first, the default) or asc, `limit` 1-100 (default 20), `after`
        an item id (the last of the previous page)."""
        _refuse_include(include)
        order = order or "desc"
        if order not in ("asc", "desc"):
            raise bad_param("order", f"order must be 'asc' or 'desc', not '{order[:20]}'.")
        try:
            count = 20 if limit is None else int(limit)
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_LIST:
            raise bad_param("limit", f"limit must be a whole number from 1 to {MAX_LIST}.")
        items = (await self._stored(owner, response_id)).input_items
        if order == "desc":
            items = items[::-1]
        start = 0
        if after is not None:
            ids = [i.get("id") for i in items]
            if after not in ids:
                raise bad_param("after", f"No input item '{after[:100]}' in response "
                                f"'{response_id[:100]}'.")
            start = ids.index(after) + 1
        page = items[start:start + count]
        return {"object": "list", "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + count < len(items)}


def _refuse_include(include: list[str] | None) -> None:
    for value in include or []:
        raise bad_param("include", f"include '{value[:80]}' is not supported.",
                        "unsupported_value")
