"""No 404 while a model's only worker restarts, through real processes: a controller, the
model's worker, a worker of another model (so the table is not empty), and an API server.
The worker is stopped with SIGTERM; until it is back every request for its model is a 503 with
Retry-After (which SDKs retry), never `404 model_not_found` (which they take as final); a name
never served is still a 404.
"""

from __future__ import annotations

import httpx
import openai

from conftest import Procs, api_models, wait_for
from llmrelay.worker.managed import free_port

MODEL = "smol-rs"


def attempt(client: openai.OpenAI, model: str) -> tuple[int, httpx.Headers | None]:
    """(HTTP status, the error's headers) of one completion; 200 when it succeeded."""
    try:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0)
    except openai.APIStatusError as e:
        return e.status_code, e.response.headers
    return 200, None


def test_a_restarting_workers_model_is_a_503_with_retry_after_never_a_404(
        procs: Procs) -> None:
    _, controller = procs.controller()
    port = free_port()
    worker, _ = procs.worker(controller, MODEL, port=port)
    procs.worker(controller, "bystander")
    _, api = procs.api(controller)
    wait_for(lambda: api_models(api) == {MODEL, "bystander"}, 30, "both models in the API")
    client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0)
    assert attempt(client, MODEL)[0] == 200
    assert attempt(client, "never-served")[0] == 404

    worker.stop()  # SIGTERM: the worker leaves
    seen: list[int] = []

    def refused_while_gone() -> bool:
        status, headers = attempt(client, MODEL)
        seen.append(status)
        assert status == 503 and headers is not None and headers.get("retry-after"), seen
        return MODEL not in api_models(api)

    # Until the API server's table has dropped the worker, and once more after that.
    wait_for(refused_while_gone, 30, "the worker to leave the API server's table")
    refused_while_gone()
    assert attempt(client, "never-served")[0] == 404

    procs.worker(controller, MODEL, port=port, wait=False)  # back, as `llmrelay up` restarts it

    def answered() -> bool:
        status, headers = attempt(client, MODEL)
        seen.append(status)
        assert status in (200, 503), seen
        assert status == 200 or (headers is not None and headers.get("retry-after")), seen
        return status == 200

    wait_for(answered, 90, "the restarted worker to answer")
    assert 404 not in seen
    assert attempt(client, "never-served")[0] == 404
