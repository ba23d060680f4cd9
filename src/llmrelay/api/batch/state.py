"""What a batch and a file are, as plain records, and the rules they follow: OpenAI's object
shapes (`to_object`), the status a batch moves through, when it expires, and the per-key limits.

A batch goes `validating` -> `in_progress` -> `finalizing` -> `completed`; or `validating` ->
`failed` (its input did not pass: `errors` names the lines); or, from `validating` or
`in_progress`, `cancelling` (asked by its owner) -> `finalizing` -> `cancelled`, or past its
window -> `finalizing` -> `expired`. `finalizing` writes the output and error files, so an
expired or cancelled batch keeps the answers it had. Each step stamps its time (`*_at`).

Plain Python with an injectable clock (`now` arguments); the store keeps these records, the
runner and the serving code move them on.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from llmrelay.api.errors import APIError

OPEN = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
WINDOWS = {"24h": 86400.0}  # OpenAI accepts only "24h"
PURPOSES = ("batch", "batch_output", "assistants", "assistants_output", "fine-tune",
            "fine-tune-results", "vision", "user_data", "evals")
UPLOAD_PURPOSES = tuple(p for p in PURPOSES if not p.endswith(("_output", "-results")))
MAX_METADATA = 16  # pairs, as OpenAI
MIN_EXPIRY = 3600  # seconds: the shortest `expires_after` OpenAI accepts (one hour) ...
MAX_EXPIRY = 30 * 86400  # ... and the longest (30 days)


def new_id(prefix: str) -> str:
    """Ids as OpenAI writes them: `file-...`, `batch_...`, `batch_req_...`."""
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class FileRecord:
    id: str
    owner: str  # sha256 of the API key (never the key); "" on a server without keys
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None = None  # deleted by the sweep after this (None: kept)

    def to_object(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": self.expires_at}

    def gone(self, now: float) -> bool:
        """Past its `expires_at`: reads as deleted even before the sweep removes it."""
        return self.expires_at is not None and now >= self.expires_at


@dataclass
class BatchRecord:
    id: str
    owner: str
    key_name: str  # whose usage its lines are (the key's name)
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    status: str = "validating"
    model: str | None = None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    stamps: dict[str, int] = field(default_factory=dict)  # "in_progress_at": ..., ...
    total: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ending: str | None = None  # what `finalizing` ends as: completed, expired, cancelled
    output_expires_after: int | None = None  # seconds: its output and error files' lifetime
    runner: str | None = None  # several API servers: the one running it (its address) ...
    lease_until: float = 0.0  # ... until then unless renewed (then another may take it over)

    # ---- moving on -------------------------------------------------------------------------

    def _to(self, status: str, now: float) -> None:
        self.status = status
        self.stamps[f"{status}_at"] = int(now)

    def start(self, total: int, model: str | None, now: float) -> None:
        """Validated: its `total` lines run."""
        self.total, self.model = total, model
        self._to("in_progress", now)

    def fail(self, errors: list[dict[str, Any]], now: float) -> None:
        self.errors = errors
        self._to("failed", now)

    def cancel(self, now: float) -> None:
        """Its owner asked: `cancelling` (the runner stops its lines, then finalizes); 409 once
        it has ended."""
        if self.status in ("cancelling", "cancelled"):
            return
        if self.status not in ("validating", "in_progress"):
            raise APIError(409, f"Cannot cancel a batch with status '{self.status}'.",
                           code="invalid_state")
        self._to("cancelling", now)

    def expired(self, now: float) -> bool:
        """Past its window with lines still to run."""
        return self.status in ("validating", "in_progress") and now >= self.expires_at

    def finalize(self, ending: str, now: float) -> None:
        """Its lines are over (`ending`: completed, expired, cancelled); files next."""
        self.ending = ending
        self._to("finalizing", now)

    def finish(self, output_file_id: str | None, error_file_id: str | None, now: float) -> None:
        self.output_file_id, self.error_file_id = output_file_id, error_file_id
        self._to(self.ending or "completed", now)

    def count(self, ok: bool, prompt_tokens: int, completion_tokens: int) -> None:
        """One line answered (ok: status 200)."""
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def adopt(self, stored: BatchRecord) -> None:
        """Become `stored` (the same batch as the store has it now), in place."""
        self.__dict__.update(stored.__dict__)

    # ---- as stored and as shown ------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchRecord:
        return cls(**data)

    def to_object(self) -> dict[str, Any]:
        """OpenAI's Batch object."""
        stamp = self.stamps.get
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "in_progress_at": stamp("in_progress_at"), "expires_at": self.expires_at,
            "finalizing_at": stamp("finalizing_at"), "completed_at": stamp("completed_at"),
            "failed_at": stamp("failed_at"), "expired_at": stamp("expired_at"),
            "cancelling_at": stamp("cancelling_at"), "cancelled_at": stamp("cancelled_at"),
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "usage": {"input_tokens": self.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": self.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
            "metadata": self.metadata,
        }


# ---- the per-key limits --------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLimits:
    """`--files-max-mb` (one upload), `--files-max-mb-per-key` (all of a key's files, outputs
    included), `--max-open-batches` (a key's batches not yet ended), how long a
    completion window of "24h" lasts (`--batch-window`, for tests) and the shortest
    `expires_after` a file may ask (`--files-min-expiry`: OpenAI's 3600 s; lower for tests)."""

    max_file_bytes: int = 200 * 1024 * 1024  # OpenAI's limit for a batch's input file
    max_key_bytes: int = 2 * 1024 * 1024 * 1024
    max_open_batches: int = 16
    window_seconds: float = WINDOWS["24h"]
    min_expiry_seconds: int = MIN_EXPIRY

    def check_upload(self, size: int, stored: int) -> None:
        """413 for a file over the upload limit, 400 when the key's files would pass theirs."""
        if size > self.max_file_bytes:
            raise APIError(413, f"The file is {size} bytes; this server accepts files of at "
                           f"most {self.max_file_bytes} bytes (--files-max-mb).", param="file",
                           code="file_too_large")
        if stored + size > self.max_key_bytes:
            raise APIError(400, f"This key's files would take {stored + size} bytes, more than "
                           f"the {self.max_key_bytes} bytes a key may store "
                           "(--files-max-mb-per-key); delete some files first.", param="file",
                           code="storage_limit_exceeded")

    def check_open(self, open_batches: int) -> None:
        if open_batches >= self.max_open_batches:
            raise APIError(429, f"This key has {open_batches} batches not yet ended, the most "
                           "it may have (--max-open-batches); wait for one to end or cancel "
                           "one.", type="rate_limit_exceeded", code="batch_limit_exceeded")

    def window(self, completion_window: str) -> float:
        if completion_window not in WINDOWS:
            raise APIError(400, f"Invalid value for 'completion_window': "
                           f"'{completion_window[:40]}'; supported: "
                           f"{', '.join(WINDOWS)}.", param="completion_window",
                           code="invalid_value")
        return self.window_seconds

    def expiry(self, value: Any, param: str) -> int | None:
        """OpenAI's `{"anchor": "created_at", "seconds": N}` (`expires_after` of an upload,
        `output_expires_after` of a batch): N seconds, from the minimum to 30 days; None when
        absent."""
        if value is None:
            return None
        seconds = value.get("seconds") if isinstance(value, dict) else None
        if (not isinstance(value, dict) or value.get("anchor") != "created_at"
                or isinstance(seconds, bool) or not isinstance(seconds, int)
                or not self.min_expiry_seconds <= seconds <= MAX_EXPIRY):
            raise APIError(400, f"Invalid value for '{param}': it must be {{\"anchor\": "
                           f"\"created_at\", \"seconds\": N}} with N from "
                           f"{self.min_expiry_seconds} to {MAX_EXPIRY}.", param=param,
                           code="invalid_value")
        return seconds


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 and values 512 characters."""
    if metadata is None:
        return None
    if (not isinstance(metadata, dict) or len(metadata) > MAX_METADATA
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64
                       and len(v) <= 512 for k, v in metadata.items())):
        raise APIError(400, "metadata must be an object of at most 16 string pairs (keys up to "
                       "64 characters, values up to 512).", param="metadata",
                       code="invalid_value")
    return dict(metadata)
