"""`POST /v1/responses/compact` (Open Responses, 2026-04-24): a conversation -> a shorter one
that a later request passes back in `input`.

How it compacts (docs/responses-api.md): the conversation (`previous_response_id`'s stored
items and output, then `input`, after `instructions`) goes to the model once with a request to
summarise it; the answer is the conversation's user, system and developer messages verbatim,
then one `compaction` item holding that summary. Its `encrypted_content` is not encrypted: it is
the summary as base64url JSON (`{"v": 1, "summary": ...}`), opaque to clients by contract only.
Passed back in `input`, the item becomes an assistant message saying "Summary of the earlier
conversation: ..." (items.py), in place of the assistant turns, calls and call outputs it
replaced.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmrelay.api.errors import bad_param
from llmrelay.api.responses.protocol import IGNORED, ResponseUsage, new_id

SUMMARY_PREFIX = "Summary of the earlier conversation:\n"
# What the model is asked after the conversation (a user turn).
INSTRUCTION = ("Write a concise summary of the conversation so far: the user's requests, what "
               "was answered, the results of any tool calls, and anything still to be done. "
               "Write only the summary.")
MAX_SUMMARY_TOKENS = 512
KEEP_ROLES = ("user", "system", "developer")


class CompactRequest(BaseModel):
    """CompactResponseMethodPublicBody: `model` required; `input`, `previous_response_id`,
    `instructions` optional. Parameters of IGNORED are accepted (no effect); others are 400."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[Any] | None = None
    previous_response_id: str | None = None
    instructions: str | None = None

    def refuse_unsupported(self) -> None:
        for key in self.model_extra or {}:
            if key not in IGNORED:
                raise bad_param(key, f"Unknown parameter: '{key[:64]}'.", "unknown_parameter")
        if self.input is None and not self.previous_response_id:
            raise bad_param("input", "Nothing to compact: send input, previous_response_id, or "
                            "both.")


@dataclass(kw_only=True)
class CompactResource:
    id: str
    object: str = "response.compaction"
    created_at: int
    output: list[dict[str, Any]]
    usage: ResponseUsage


def encode(summary: str) -> str:
    """A summary as a compaction item's `encrypted_content`."""
    raw = json.dumps({"v": 1, "summary": summary}, ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode(content: Any, param: str) -> str:
    """The summary in a compaction item's `encrypted_content`; a 400 naming `param` when it is
    not one this server wrote."""
    try:
        value = json.loads(base64.urlsafe_b64decode(str(content).encode()))
    except (ValueError, binascii.Error):
        value = None
    if not isinstance(value, dict) or value.get("v") != 1 or not isinstance(
            value.get("summary"), str):
        raise bad_param(param, f"{param} is not a compaction made by this server "
                        "(POST /v1/responses/compact).")
    return value["summary"]


def compaction_item(summary: str) -> dict[str, Any]:
    return {"id": new_id("cmp"), "type": "compaction", "encrypted_content": encode(summary)}


def compacted(conversation: list[dict[str, Any]], summary: str) -> list[dict[str, Any]]:
    """The compacted conversation: its user, system and developer messages as they were, then
    the compaction item (which stands for everything else, and for earlier compactions)."""
    kept = [i for i in conversation if i["type"] == "message" and i["role"] in KEEP_ROLES]
    return kept + [compaction_item(summary)]
