"""One request line of a batch, served in this process by the same serving object as its HTTP
front door (chat, completions, embeddings, responses): the same checks, the same pipeline and
transport (failover, continuation), the same answer. No HTTP call to ourselves: the line's
request record (observe.py) carries a key of priority class `batch`, and the serving object gets
it as the line's caller, which the transport sends to the workers, whose fair queue admits it
after interactive work (worker/fairness.py).

The answer is `(status, body, prompt tokens, completion tokens)`: 200 and the door's JSON
answer, or the door's error status and its OpenAI error body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import Message

from llmrelay.api.batch.lines import parse_request
from llmrelay.api.chat.serving import ChatServing
from llmrelay.api.completions.serving import CompletionServing
from llmrelay.api.embeddings.serving import EmbeddingServing
from llmrelay.api.errors import APIError
from llmrelay.api.keys import Key
from llmrelay.api.observe import RequestRecord, begin
from llmrelay.api.plan import Caller
from llmrelay.api.responses.serving import ResponsesServing
from llmrelay.protocol import dumps, loads

log = logging.getLogger("llmrelay.api")

Answer = tuple[int, dict[str, Any], int, int]


async def never_gone() -> Message:
    """The `receive` of a line: nobody disconnects (a stopped batch cancels its line's task)."""
    await asyncio.get_running_loop().create_future()  # waits until cancelled
    raise AssertionError("unreachable")


@dataclass
class Doors:
    """The serving objects of the endpoints a batch may name."""

    chat: ChatServing
    completions: CompletionServing
    embeddings: EmbeddingServing
    responses: ResponsesServing

    async def run(self, endpoint: str, body: dict[str, Any], request_id: str, owner: str,
                  key: Key) -> Answer:
        """Serve one line (run it in a task of its own: its request record is the task's)."""
        rec = RequestRecord(started=time.monotonic(), key=key)
        begin(rec)
        try:
            req: Any = parse_request(endpoint, body)
            caller = Caller.of(key)  # priority class `batch`, for the workers' fair queues
            if endpoint == "/v1/chat/completions":
                answer: Any = await self.chat.create(req, request_id, never_gone, caller)
            elif endpoint == "/v1/completions":
                answer = await self.completions.create(req, request_id, never_gone, caller)
            elif endpoint == "/v1/embeddings":
                answer = await self.embeddings.create(req, never_gone)
            else:
                answer = await self.responses.create(req, request_id, owner, never_gone, caller)
        except APIError as e:
            prompt, completion = rec.billed or (rec.prompt_tokens, rec.completion_tokens)
            return e.status, e.body(), prompt, completion
        except Exception:
            log.exception("batch line %s failed", request_id)
            err = APIError(500, "The server had an error while processing this request.",
                           type="server_error")
            return err.status, err.body(), 0, 0
        prompt, completion = rec.billed or (rec.prompt_tokens, rec.completion_tokens)
        return 200, loads(dumps(answer)), prompt, completion
