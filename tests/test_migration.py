"""A stream survives the death of its worker (issue 21): two workers of the bundled model, 8
concurrent greedy streams; one worker is killed with SIGKILL while every stream is mid-answer,
at several moments; every answer completes, byte-identical to the same request on an undisturbed
stack, with the same id and usage counted once. Also: a json_schema answer moved mid-way still
validates, and a non-streamed answer moves instead of starting over."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jsonschema
import openai
import pytest

from conftest import Proc, Procs, api_models, registered, wait_for

TOPICS = ["a dragon", "a lighthouse", "the sea", "a robot", "a garden", "a city at night",
          "a lost key", "a mountain"]
MAX_TOKENS = 120


def ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me a long story about {TOPICS[i % len(TOPICS)]}."}]


@dataclass
class Pair:
    procs: Procs
    controller: str
    api: str
    workers: dict[str, Proc]  # url -> process

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0,
                             timeout=300)

    def start_worker(self, port: int | None = None) -> str:
        p, url = self.procs.worker(self.controller, "smol", port=port,
                                   extra=("--limit-worker-concurrency", "8"))
        wait_for(lambda: registered(self.controller, url), 60, f"worker {url}")
        self.workers[url] = p
        return url


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    procs = Procs(tmp_path_factory.mktemp("migration-logs"))
    try:
        _, controller = procs.controller()
        _, api = procs.api(controller)
        p = Pair(procs, controller, api, {})
        p.start_worker()
        p.start_worker()
        wait_for(lambda: api_models(api) == {"smol"}, 30, "smol in the API")
        yield p
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def reference(pair: Pair) -> dict[int, tuple[str, int]]:
    """Each request's answer (text, completion tokens) on the undisturbed pair."""
    c = pair.client()
    out = {}
    for i in range(8):
        r = c.chat.completions.create(model="smol", messages=ask(i), max_tokens=MAX_TOKENS,
                                      temperature=0)
        out[i] = (r.choices[0].message.content or "", r.usage.completion_tokens)
    return out


def stream_all(pair: Pair, kill_after: int) -> dict[int, tuple[str, int, set[str]]]:
    """8 concurrent greedy streams; once every one has received `kill_after` chunks of text,
    the worker serving the most of them is killed (SIGKILL). Returns each stream's text,
    completion tokens and the chunk ids it saw."""
    c = pair.client()
    results: dict[int, tuple[str, int, set[str]]] = {}
    errors: list[BaseException] = []
    seen = [0] * 8
    all_started = threading.Barrier(9)
    killed = threading.Event()

    def one(i: int) -> None:
        text, ids, usage = "", set(), 0
        try:
            stream = c.chat.completions.create(model="smol", messages=ask(i), stream=True,
                                               max_tokens=MAX_TOKENS, temperature=0,
                                               stream_options={"include_usage": True})
            passed = False
            for chunk in stream:
                ids.add(chunk.id)
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
                for ch in chunk.choices:
                    if ch.delta.content:
                        text += ch.delta.content
                        seen[i] += 1
                if not passed and seen[i] >= kill_after:
                    passed = True
                    all_started.wait(60)
                    killed.wait(60)  # read on only once the worker is dead
            results[i] = (text, usage, ids)
        except BaseException as e:  # reported below
            errors.append(e)
            if not all_started.broken:
                all_started.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    all_started.wait(120)
    busiest = max(pair.workers, key=lambda u: httpx.post(u + "/worker_get_status").json()
                  ["llmrelay"]["running"])
    assert httpx.post(busiest + "/worker_get_status").json()["llmrelay"]["running"] > 0
    pair.workers.pop(busiest).kill()
    killed.set()
    for t in threads:
        t.join(300)
    assert not errors, errors
    port = int(busiest.rsplit(":", 1)[1])
    pair.start_worker(port)  # back for the next round, on the same address
    return results


@pytest.mark.parametrize("kill_after", [2, 12])
def test_every_stream_completes_byte_identical_when_its_worker_dies(
        pair: Pair, reference: dict[int, tuple[str, int]], kill_after: int) -> None:
    results = stream_all(pair, kill_after)
    for i in range(8):
        text, usage, ids = results[i]
        assert text == reference[i][0], f"stream {i} differs after the kill"
        assert usage == reference[i][1]  # the whole answer counted once
        assert len(ids) == 1  # one response id throughout
    metrics = httpx.get(pair.api + "/metrics").text
    assert "llmrelay_api_migrations_total" in metrics


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "story": {"type": "string", "maxLength": 400}},
    "required": ["name", "age", "story"], "additionalProperties": False}


def _kill_mid_answer(pair: Pair, run: object, into: threading.Event | None = None) -> object:
    """Run `run()` in a thread, kill the worker serving it once it is generating (and `into` is
    set, for a stream: its first pieces came), return what `run` returned; the killed worker
    comes back afterwards."""
    out: list[object] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            out.append(run())  # type: ignore[operator]
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=go)
    t.start()

    def busy() -> str | None:
        for u in pair.workers:
            st = httpx.post(u + "/worker_get_status").json()["llmrelay"]
            if st["running"]:
                return u
        return None

    wait_for(lambda: busy() is not None, 60, "a worker generating")
    if into is None:
        time.sleep(0.25)  # into the answer (120 tokens), not past it on a fast machine
    else:
        assert into.wait(60), "the stream never got its first pieces"
    url = busy()
    assert url is not None
    pair.workers.pop(url).kill()
    t.join(300)
    pair.start_worker(int(url.rsplit(":", 1)[1]))
    assert not errors, errors
    return out[0]


def test_a_json_schema_answer_moved_mid_way_still_validates(pair: Pair) -> None:
    c = pair.client()
    kw = dict(model="smol", max_tokens=300, temperature=0,
              messages=[{"role": "user", "content": "Invent a person with a long story."}],
              response_format={"type": "json_schema", "json_schema": {"name": "p",
                                                                      "schema": PERSON}})
    undisturbed = c.chat.completions.create(**kw).choices[0].message.content

    into = threading.Event()

    def streamed() -> str:
        parts = []
        for ch in c.chat.completions.create(stream=True, **kw):
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
                if len(parts) == 4:
                    into.set()  # mid-way: killed now, not after a fixed time it may outrun
        return "".join(parts)

    moved = _kill_mid_answer(pair, streamed, into)
    jsonschema.validate(json.loads(moved), PERSON)  # type: ignore[arg-type]
    assert moved == undisturbed


def test_a_non_streamed_answer_moves_instead_of_starting_over(
        pair: Pair, reference: dict[int, tuple[str, int]]) -> None:
    c = pair.client()

    def whole() -> tuple[str, int]:
        r = c.chat.completions.create(model="smol", messages=ask(0), max_tokens=MAX_TOKENS,
                                      temperature=0)
        return r.choices[0].message.content or "", r.usage.completion_tokens

    assert _kill_mid_answer(pair, whole) == reference[0]
    api_log = next(p for p in pair.procs.all if p.name.startswith("api-")).log()
    assert "moved from" in api_log  # the log line names both workers
