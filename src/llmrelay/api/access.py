"""Who may do what at the API server, and what each key used.

`Access` ties together the keys (keys.KeyStore), the limits (limits.LimitStore), the usage store
(usage.UsageStore) and the per-key metrics:
- `authenticate`: the `Authorization: Bearer` header -> the caller's `Key` (its name from then
  on, never the secret); 401 otherwise.
- `enter`: before a request runs: a model the key may not use is a 404 exactly as if it did not
  exist (the message lists only the models the key may use); then the key's limits, a 429 in
  OpenAI's shape naming the limit (`type`: requests, tokens or concurrent) with `Retry-After`
  (whole seconds) and `retry-after-ms` (which the openai SDKs read first), counted per key, limit
  and day in the usage store.
- `finish`: once per request, as its answer ends (observe.py awaits it before the answer's last
  bytes): the tokens the answer's `usage` reported go to the limits, the usage store (committed
  to SQLite before it returns) and the per-key counters.
- `report`: `GET /v1/usage`, for admin keys.
- `check_operator` / `is_operator`: what only the operator sees, with keys on: the metrics, the
  worker table, `/health`'s details, the usage (admin keys; `/metrics` also for `metrics_only`
  keys, which may do nothing else). With no keys everything is open.

Plain Python with no HTTP; routes.py calls it, tests drive it with their own stores.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from llmrelay.api.errors import APIError
from llmrelay.api.keys import Key, KeyStore
from llmrelay.api.limits import LimitStore, LocalLimits, retry_after_header
from llmrelay.api.observe import RequestRecord, current
from llmrelay.api.table import WorkerTable
from llmrelay.api.usage import UsageStore
from llmrelay.metrics import ApiMetrics

log = logging.getLogger("llmrelay.api")

ANONYMOUS = "anonymous"  # usage of a server without API keys is counted under this name
DAY_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def allowed_models(key: Key | None) -> Callable[[str], bool] | None:
    """The test for the models a key may see and use (None: every model)."""
    return key.may_use if key is not None and key.models else None


class Access:
    def __init__(self, keys: KeyStore, limits: LimitStore | None = None,
                 usage: UsageStore | None = None, metrics: ApiMetrics | None = None) -> None:
        self.keys = keys
        self.limits: LimitStore = limits or LocalLimits()
        self.usage = usage
        self.metrics = metrics

    @property
    def enabled(self) -> bool:
        """Whether requests must carry an API key."""
        return self.keys.enabled

    # ---- before a request runs -----------------------------------------------------------------

    def authenticate(self, authorization: str) -> Key:
        """The key an `Authorization` header presents; 401 without one or for an unknown one.
        The secret is hashed, then looked up (keys.py): no comparison depends on its bytes."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Send it as "
                           "'Authorization: Bearer YOUR_KEY' (or 'x-api-key: YOUR_KEY').",
                           code="invalid_api_key")
        key = self.keys.lookup(token.strip())
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    async def enter(self, key: Key | None, model: str, table: WorkerTable) -> None:
        """A request of `key` for `model` may run: 404 for a model it may not use (as for one
        nobody serves), 429 when it is at a limit; else it is counted (`finish` ends it)."""
        table.check_model(model, allowed_models(key))
        if key is None or not key.limited:
            return
        refusal = await self.limits.admit(key)
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.key_rate_limited.labels(key.name, refusal.limit).inc()
            if self.usage is not None:  # the day's 429s, committed before the 429 leaves
                try:
                    await self.usage.refused(key.name, refusal.limit)
                except Exception:  # accounting must not change the answer
                    log.exception("could not count a 429")
            raise APIError(429, refusal.message, type=refusal.limit, code="rate_limit_exceeded",
                           headers={"Retry-After": retry_after_header(refusal.retry_after),
                                    "retry-after-ms": str(max(1, round(refusal.retry_after
                                                                       * 1000)))})
        rec = current()
        if rec is not None:
            rec.admitted = True
        else:  # not a request observe.py follows: nothing would end it
            await self.limits.done(key, 0)

    # ---- the operator's routes --------------------------------------------------------------

    def check_key(self, key: Key) -> None:
        """403 for a metrics-only key on any route but `/metrics`."""
        if key.metrics_only:
            raise APIError(403, "This API key may only read /metrics (metrics_only = true in "
                           "the keys file).", code="insufficient_permissions")

    def check_operator(self, key: Key | None, what: str, scrape: bool = False) -> None:
        """403 unless `key` may read `what` (operator data): an admin key; with `scrape`
        (`/metrics`), a metrics-only key too. Anyone on a server without keys."""
        if not self.enabled or (key is not None and (key.admin or scrape and key.metrics_only)):
            return
        who = "`admin = true` or `metrics_only = true`" if scrape else "`admin = true`"
        raise APIError(403, f"This API key may not read {what}: it needs {who} in the keys "
                       "file.", code="insufficient_permissions")

    def is_operator(self, authorization: str) -> bool:
        """Whether an `Authorization` header presents an admin key (always, without keys);
        never raises."""
        if not self.enabled:
            return True
        try:
            return self.authenticate(authorization).admin
        except APIError:
            return False

    # ---- when it ends -------------------------------------------------------------------------

    async def finish(self, rec: RequestRecord) -> None:
        """Charge what the request used (observe.py calls this once per `/v1` request, before
        the answer's last bytes go out). Never raises: accounting must not break an answer."""
        try:
            prompt, completion = rec.billed or (rec.prompt_tokens, rec.completion_tokens)
            key = rec.key
            if rec.admitted and key is not None:
                await self.limits.done(key, prompt + completion)
            if not rec.model or (rec.status >= 400 and not prompt + completion):
                return  # nothing was served
            name = key.name if key is not None else ANONYMOUS
            if self.metrics is not None:
                m = self.metrics
                m.key_requests.labels(name, rec.model).inc()
                m.key_prompt_tokens.labels(name, rec.model).inc(prompt)
                m.key_completion_tokens.labels(name, rec.model).inc(completion)
            if self.usage is not None:  # committed before the answer's last bytes leave
                await self.usage.record(name, rec.model, prompt, completion)
        except Exception:
            log.exception("could not count a request's usage")

    # ---- GET /v1/usage ------------------------------------------------------------------------

    async def report(self, key: Key | None, since: str | None = None,
                     of_key: str | None = None) -> dict[str, Any]:
        """Usage rows (day, key, model, requests, prompt and completion tokens), newest day
        first, for an admin key (or anyone on a server without keys)."""
        self.check_operator(key, "usage")
        if since is not None and not DAY_FORMAT.match(since):
            raise APIError(400, "since must be a date, YYYY-MM-DD (UTC).", param="since",
                           code="invalid_value")
        rows = await self.usage.report_async(since, of_key) if self.usage is not None else []
        return {"object": "list", "data": rows}
