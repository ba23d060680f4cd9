"""A key's fair share on a worker whose queue is full (`--max-queue`), through real processes:
a controller, one worker with one place, a reserve place and a short queue, and an API server
with a keys file. Key A floods the worker until its queue is full and keeps it full; key B's few
requests must all be answered (no 429) and start ahead of A's waiting ones: the reserve place
takes B's first at once, and B's others push out A's newest waiters (worker/fairness.py).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx

from conftest import Procs, wait_for
from llmrelay.api.keys import add_key

MODEL = "fairfull"
MAX_QUEUE = 4
B_REQUESTS = 3  # B's places: 1 in the reserve, then one from A per request while A holds more


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_keeps_its_share_on_a_worker_another_key_fills_to_its_queue_limit(
        procs: Procs, tmp_path: Path) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, MODEL, extra=(
        "--limit-worker-concurrency", "1", "--max-queue", str(MAX_QUEUE), "--fair-reserve", "1"))
    keys = tmp_path / "keys.toml"
    a, b = add_key(keys, "a", models=[MODEL]), add_key(keys, "b", models=[MODEL])
    _, api = procs.api(controller, extra=("--api-keys-file", str(keys),
                                          "--data-dir", str(tmp_path / "data")))
    wait_for(lambda: MODEL in httpx.get(api + "/v1/models", headers=bearer(a)).text, 30,
             "the worker in the API")
    events: list[str] = []  # "a" when one of A's requests starts generating, "b0".. for B's
    lock = threading.Lock()
    a_refused = [0]
    b_status: dict[int, int] = {}

    def status() -> dict:  # type: ignore[type-arg]
        return httpx.post(worker + "/worker_get_status").json()

    def full() -> bool:
        s = status()
        return s["queue_length"] - s["llmrelay"]["running"] >= MAX_QUEUE

    async def stream(c: httpx.AsyncClient, key: str, body: dict, started: str) -> int:  # type: ignore[type-arg]
        async with c.stream("POST", api + "/v1/completions", headers=bearer(key), json={
                "model": MODEL, "temperature": 0, "stream": True, **body}) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code
            first = True
            async for line in r.aiter_lines():
                if first and line.startswith("data: {"):
                    first = False
                    with lock:
                        events.append(started)
        return 200

    async def scenario() -> None:
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as c:
            async def flood() -> None:  # one of A's clients: again and again, through 429s
                while not stop.is_set():
                    code = await stream(c, a, {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 300},
                                        "a")
                    if code == 429:
                        a_refused[0] += 1
                        await asyncio.sleep(0.05)
                    else:
                        assert code == 200

            floods = [asyncio.create_task(flood()) for _ in range(MAX_QUEUE + 4)]
            await asyncio.to_thread(wait_for, full, 60, "A to fill the worker's queue")
            with lock:
                sent_at = len(events)

            async def one(i: int) -> None:
                b_status[i] = await stream(c, b, {"prompt": "Once upon a time",
                                                  "max_tokens": 8}, f"b{i}")

            await asyncio.gather(*(one(i) for i in range(B_REQUESTS)))
            stop.set()
            for t in floods:
                t.cancel()
            await asyncio.gather(*floods, return_exceptions=True)
        after = events[sent_at:]
        assert b_status == {i: 200 for i in range(B_REQUESTS)}, (b_status, after)
        assert a_refused[0] > 0  # A's own flood is what the full queue refuses
        # B starts ahead of A's waiting requests: at most the request A had running when B
        # came ends meanwhile, so at most one of A's starts before each of B's.
        for i in range(B_REQUESTS):
            assert after[:after.index(f"b{i}")].count("a") <= 1, after

    asyncio.run(scenario())
