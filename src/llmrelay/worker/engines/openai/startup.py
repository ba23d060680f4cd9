"""What happens before the worker serves, synchronously in `load`: starting the managed server
and waiting until it answers, and reading the upstream's model list when `--model-names` gives
no names (the worker registers under the upstream's own model ids). Plain blocking HTTP with a
short-lived client: the engine's own client is made later, on the worker's event loop."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from llmrelay.worker import managed as mg
from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.engines.openai.errors import map_error
from llmrelay.worker.engines.openai.health import CHECK_TIMEOUT, model_entries
from llmrelay.worker.engines.openai.options import ManagedPlan, Options

log = logging.getLogger("llmrelay.worker")


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def start_managed(plan: ManagedPlan, key: str | None) -> mg.ManagedServer:
    """Start the managed server and wait until it answers `GET /v1/models`; EngineError if it
    exits first or takes longer than `--managed-start-timeout`."""
    server = mg.ManagedServer(plan.server, plan.argv, plan.base_url)
    server.start()
    try:
        server.wait_ready(plan.start_timeout, auth(key))
    except mg.ManagedError as e:
        raise EngineError(str(e)) from e
    return server


def models_now(client: httpx.Client, base_url: str) -> list[dict[str, Any]]:
    r = client.get(base_url + "/models")
    if r.status_code != 200:
        raise map_error(r.status_code, r.text, "model list")
    return model_entries(r.json().get("data"))


def wait_for_models(options: Options, timeout: float | None = None) -> list[dict[str, Any]]:
    """Block until the upstream answers its model list, logging while it does not; the list."""
    delay, started = 0.5, time.monotonic()
    with httpx.Client(timeout=CHECK_TIMEOUT, headers=auth(options.api_key)) as client:
        while True:
            try:
                models = models_now(client, options.base_url)
                break
            except (httpx.HTTPError, ValueError, EngineError) as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if timeout is not None and time.monotonic() - started > timeout:
                raise EngineError(f"the upstream {options.base_url} did not answer in "
                                  f"{timeout:.0f} s ({error})")
            log.warning("upstream %s not reachable (%s); retrying in %.1f s (give --model-names "
                        "to register without waiting)", options.base_url, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    if not models:
        raise EngineError(f"the upstream {options.base_url} serves no models; give --model-names")
    return models
