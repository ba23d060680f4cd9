"""The API server's parts driven without a server: the worker table's rules, FastChat's
cumulative frames turned into deltas, the FastChat adapter, the chat and completions serving
shaping frames into OpenAI's objects and chunks, and the transport's failover for embeddings
(against a stub worker on a real loopback port, in this process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from llmrelay.api.chat.protocol import ChatCompletionRequest
from llmrelay.api.chat.serving import ChatServing
from llmrelay.api.completions.protocol import CompletionRequest
from llmrelay.api.completions.serving import CompletionServing
from llmrelay.api.errors import APIError
from llmrelay.api.fastchat import CumulativeToDelta, FastChatAdapter, WorkerUnsuitable
from llmrelay.api.frames import Delta
from llmrelay.api.pipeline import Limits, Pipeline, Streamed, merged, sse_stream
from llmrelay.api.table import Worker, WorkerTable
from llmrelay.api.transport import WorkerTransport
from llmrelay.protocol import OUR_EXTENSIONS, dumps, logprob_entry
from llmrelay.worker.managed import free_port

# ---- the table --------------------------------------------------------------------------------


def entry(name: str, models: list[str] | None = None, queue: int = 0, beat: float = 100.0,
          speed: float = 1.0, ours: dict[str, Any] | None = None,
          fastchat: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"model_names": models or ["m"], "speed": speed,
                              "queue_length": queue}
    if not fastchat:
        status["llmrelay"] = {"extensions": OUR_EXTENSIONS, **(ours or {})}
    return {"name": name, "model_names": models or ["m"], "speed": speed, "queue_length": queue,
            "last_heart_beat": beat, "registered_at": 1.0, "status": status}


def table_of(*entries: dict[str, Any], method: str = "shortest_queue",
             seed: int = 0, **extra: Any) -> WorkerTable:
    t = WorkerTable(["http://controller"], rng=random.Random(seed))
    t.apply({"dispatch_method": method, "workers": list(entries), **extra})
    return t


def test_table_reads_each_status_once_when_applied() -> None:
    t = table_of(entry("a", ours={"ready": False, "features": {"embeddings": True,
                                                                "embedding_dimensions": [384]}}),
                 entry("f", fastchat=True))
    a, f = t.workers["a"], t.workers["f"]
    assert a.ours is not None and a.speaks_ours and a.takes_token_ids
    assert not a.ready and a.serves_embeddings and a.embedding_dimensions == [384]
    # A FastChat worker: no section, spoken to in FastChat's protocol, taken at its word.
    assert f.ours is None and f.features is None and not f.speaks_ours
    assert f.ready and f.serves_embeddings and f.embedding_dimensions == []
    assert t.loaded and t.models() == {"m": 1.0}


def test_table_picks_the_shortest_queue_counting_our_requests_in_flight() -> None:
    t = table_of(entry("a"), entry("b", queue=1))
    assert t.pick("m").name == "a"
    t.acquire("a")
    t.acquire("a")
    assert t.pick("m").name == "b"  # a: 0 + 2 in flight, b: 1
    t.release("a")
    t.release("a")
    assert t.inflight == {} and t.pick("m").name == "a"
    # The reported queue counts our requests: the table keeps only the load from elsewhere.
    t.acquire("b")
    t.apply({"workers": [entry("a"), entry("b", queue=2)]})
    assert t.workers["b"].queue_length == 1


def test_table_pick_skips_excluded_down_unready_and_unaccepted_workers() -> None:
    t = table_of(entry("a"), entry("b"), entry("c", ours={"ready": False}),
                 entry("x", models=["other"]))
    assert {t.pick("m", exclude={"a"}).name for _ in range(5)} == {"b"}
    assert t.pick("m", exclude={"a", "b"}) is None  # c is not ready
    assert {t.pick("m", accept=lambda w: w.name == "b").name for _ in range(5)} == {"b"}
    assert t.pick("nobody") is None


def test_table_down_marks_last_until_the_next_heartbeat() -> None:
    t = table_of(entry("a", beat=100), entry("b", beat=100, queue=3))
    t.mark_down(t.workers["a"])
    assert t.pick("m").name == "b"
    t.apply({"workers": [entry("a", beat=100), entry("b", beat=100, queue=3)]})
    assert "a" in t.down and t.pick("m").name == "b"  # the same heartbeat: still down
    t.apply({"workers": [entry("a", beat=101), entry("b", beat=101, queue=3)]})
    assert t.down == {} and t.pick("m").name == "a"  # it spoke again
    t.mark_down(t.workers["a"])
    t.apply({"workers": [entry("b", beat=102)]})
    assert t.down == {}  # gone from the table: the mark goes too


def test_table_keeps_known_workers_while_the_controller_warms_up() -> None:
    t = table_of(entry("a"), entry("b"))
    t.apply({"warming_up": True, "workers": [entry("b", queue=4)]})
    assert set(t.workers) == {"a", "b"} and t.workers["b"].queue_length == 4
    t.apply({"warming_up": False, "workers": [entry("b")]})
    assert set(t.workers) == {"b"}


def test_table_prefix_method_keeps_a_conversation_on_its_worker() -> None:
    t = table_of(entry("a"), entry("b"), method="prefix", seed=3)
    keys = ["k1", "k2"]
    first = t.pick("m", keys=keys)
    t.remember(keys, first.name)
    assert all(t.pick("m", keys=[*keys, "k3"]).name == first.name for _ in range(10))
    for _ in range(3):  # overloaded past the slack: back to the least loaded
        t.acquire(first.name)
    assert t.pick("m", keys=[*keys, "k3"]).name != first.name


def test_table_snapshot_is_the_last_copy_in_the_controllers_shape() -> None:
    t = WorkerTable(["http://c"], clock=lambda: 123.0)
    t.apply({"dispatch_method": "lottery", "workers": [entry("a", queue=2)]})
    snap = t.snapshot()
    assert snap["now"] == 123.0 and snap["dispatch_method"] == "lottery"
    assert [(w["name"], w["queue_length"], w["status"]["queue_length"])
            for w in snap["workers"]] == [("a", 2, 2)]


def test_table_random_source_is_injectable() -> None:
    def picks(seed: int) -> list[str]:
        t = table_of(*(entry(n) for n in "abcd"), method="lottery", seed=seed)
        return [t.pick("m").name for _ in range(20)]

    assert picks(7) == picks(7)
    assert len(set(picks(7))) > 1


def test_table_check_model_404_with_the_closest_name_and_503_without_workers() -> None:
    t = table_of(entry("a", models=["smol", "gemma"]))
    t.check_model("smol")
    with pytest.raises(APIError) as e:
        t.check_model("Smoll")
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert "Did you mean 'smol'?" in e.value.message and "gemma, smol" in e.value.message
    empty = WorkerTable(["http://c1"])
    with pytest.raises(APIError) as e:
        empty.check_model("smol")
    assert e.value.status == 503 and "http://c1 is not reachable" in e.value.message
    empty.controller_ok = True
    with pytest.raises(APIError) as e:
        empty.check_model("smol")
    assert e.value.status == 503 and "not reachable" not in e.value.message


# ---- FastChat's workers -----------------------------------------------------------------------


def test_cumulative_to_delta_text_and_half_characters() -> None:
    c = CumulativeToDelta()
    assert c({"text": "Hel", "error_code": 0})["text"] == "Hel"
    assert c({"text": "Hello w\ufffd", "error_code": 0})["text"] == "lo w"  # held back
    assert c({"text": "Hello w\u00f6", "error_code": 0})["text"] == "\u00f6"
    assert c({"text": "Hello", "error_code": 0})["text"] == ""  # shorter: nothing new
    last = c({"text": "Hello w\u00f6rld\ufffd", "error_code": 0, "finish_reason": "stop"})
    assert last["text"] == "rld\ufffd" and last["finish_reason"] == "stop"  # the end: all of it
    error = {"text": "boom", "error_code": 50001}
    assert c(error) is error


def test_cumulative_to_delta_logprobs_become_new_entries() -> None:
    c = CumulativeToDelta()
    lp = {"tokens": ["A", "B"], "token_logprobs": [None, -0.5], "text_offset": [0, 1],
          "top_logprobs": [{}, {}]}
    first = c({"text": "AB", "error_code": 0, "logprobs": lp})
    assert first["logprobs"] == {"content": [logprob_entry("A", 0.0), logprob_entry("B", -0.5)],
                                 "text_offset": [0, 1]}
    same = c({"text": "AB", "error_code": 0, "logprobs": lp})
    assert same["logprobs"] is None  # no new token
    lp2 = {"tokens": ["A", "B", "C"], "token_logprobs": [None, -0.5, -1.0],
           "top_logprobs": [{}, {}, {"C": -1.0, "D": -2.0}]}
    more = c({"text": "ABC", "error_code": 0, "logprobs": lp2})
    assert more["text"] == "C"
    assert more["logprobs"] == {"content": [logprob_entry("C", -1.0, None,
                                                          [("C", -1.0), ("D", -2.0)])]}


CONV = {"name": "chatml", "sep_style": "CHATML", "system_template": "<|im_start|>system\n"
        "{system_message}", "system_message": "", "roles": ["<|im_start|>user",
                                                            "<|im_start|>assistant"],
        "messages": [], "offset": 0, "sep": "<|im_end|>", "stop_str": "<|im_end|>",
        "stop_token_ids": [2]}


def test_fastchat_adapter_translates_and_caches_per_registration() -> None:
    calls: list[str] = []
    counted = {"tokens": 30}

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/worker_get_conv_template":
            return httpx.Response(200, json={"conv": CONV})
        if request.url.path == "/model_details":
            return httpx.Response(200, json={"context_length": 100})
        return httpx.Response(200, json={"count": counted["tokens"], "error_code": 0})

    async def main() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        adapter = FastChatAdapter(client)
        t = table_of(entry("http://fc", fastchat=True), entry("http://ours", queue=1))
        fc, ours = t.workers["http://fc"], t.workers["http://ours"]
        params = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                  "max_new_tokens": 500, "stop": ["X"], "temperature": 0.5, "delta": True,
                  "request_id": "r1", "seed": 3}
        assert await adapter.body_for(ours, params) is params  # ours: as they are
        body = await adapter.body_for(fc, params)
        assert "<|im_start|>user\nhi<|im_end|>" in body["prompt"]
        assert body["stop"] == ["X", "<|im_end|>"] and body["stop_token_ids"] == [2]
        assert body["max_new_tokens"] == 70  # clamped to the room left: 100 - 30
        assert body["echo"] is False and body["temperature"] == 0.5
        assert not {"delta", "request_id", "seed", "messages"} & set(body)
        await adapter.body_for(fc, params)
        assert calls.count("/worker_get_conv_template") == 1  # cached per registration
        fc.registered_at += 1  # registered again: asked again
        await adapter.body_for(fc, params)
        assert calls.count("/worker_get_conv_template") == 2
        with pytest.raises(WorkerUnsuitable):  # FastChat's workers take text prompts only
            await adapter.body_for(fc, {"model": "m", "prompt_token_ids": [1, 2]})
        no_ids = Worker.of(entry("http://old", ours={"extensions": ["messages", "delta"]}))
        with pytest.raises(WorkerUnsuitable):
            await adapter.body_for(no_ids, {"model": "m", "prompt_token_ids": [1, 2]})
        counted["tokens"] = 100
        with pytest.raises(APIError) as e:
            await adapter.body_for(fc, {"model": "m", "prompt": "long"})
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"
        assert e.value.param == "prompt"
        await client.aclose()

    asyncio.run(main())


# ---- chat and completions: frames shaped into OpenAI's objects --------------------------------


async def never_gone() -> dict[str, Any]:
    """An ASGI `receive` whose client never leaves."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def batches(*items: list[tuple[int, dict[str, Any]]]
                  ) -> AsyncIterator[list[tuple[int, Delta]]]:
    """Worker frames (JSON objects) as the transport hands them on: parsed, in batches."""
    for item in items:
        yield [(i, Delta.of(f)) for i, f in item]


async def collect(chunks: AsyncIterator[list[Any]]) -> list[dict[str, Any]]:
    return [json.loads(dumps(c)) for batch in [b async for b in chunks] for c in batch]


def typed(frames: list[dict[str, Any]]) -> list[Delta]:
    """Worker frames as the transport parses them."""
    return [Delta.of(f) for f in frames]


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
ENTRIES = [logprob_entry("Hi", -0.1, None, [("Hi", -0.1)]), logprob_entry("!", -0.2)]


def test_chat_response_shape() -> None:
    finals = [{"text": "Hi!", "finish_reason": "length", "usage": USAGE,
               "logprobs": {"content": ENTRIES, "text_offset": [0, 2]}},
              {"text": "Yo", "finish_reason": "eos", "usage": {**USAGE, "completion_tokens": 1}}]
    r = json.loads(dumps(ChatServing.response("chatcmpl-x", 7, "m", typed(finals),
                                              logprobs=True)))
    assert r == {
        "id": "chatcmpl-x", "object": "chat.completion", "created": 7, "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi!", "refusal": None,
                                     "annotations": []},
             "logprobs": {"content": json.loads(dumps(ENTRIES)), "refusal": None},
             "finish_reason": "length"},
            {"index": 1, "message": {"role": "assistant", "content": "Yo", "refusal": None,
                                     "annotations": []},
             "logprobs": {"content": [], "refusal": None}, "finish_reason": "stop"}],
        # one prompt for all choices: counted once
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    plain = json.loads(dumps(ChatServing.response("c", 7, "m", typed(finals[:1]),
                                                  logprobs=False)))
    assert plain["choices"][0]["logprobs"] is None


def test_chat_chunks_shape() -> None:
    frames = batches(
        [(0, {"text": "Hi", "logprobs": {"content": ENTRIES[:1]}}), (1, {"text": "Yo"})],
        [(0, {"text": "!", "logprobs": {"content": ENTRIES[1:]}, "finish_reason": "stop",
              "usage": USAGE}),
         (1, {"text": "", "finish_reason": "length", "usage": USAGE})])
    out = asyncio.run(collect(ChatServing.chunks("c", 7, "m", 2, frames, logprobs=True,
                                                 include_usage=True)))
    head = {"id": "c", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    lp0 = {"content": json.loads(dumps(ENTRIES[:1])), "refusal": None}
    lp1 = {"content": json.loads(dumps(ENTRIES[1:])), "refusal": None}

    def choice(i: int, delta: dict[str, Any], lp: Any = None, finish: Any = None) -> Any:
        return {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                     "finish_reason": finish}]}

    assert out == [
        choice(0, {"role": "assistant", "content": ""}),
        choice(1, {"role": "assistant", "content": ""}),
        choice(0, {"content": "Hi"}, lp0), choice(1, {"content": "Yo"}),
        choice(0, {"content": "!"}, lp1), choice(0, {}, finish="stop"),
        choice(1, {}, finish="length"),
        {**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4,
                                          "total_tokens": 9}}]
    # Without logprobs asked for and without usage: no logprobs, no usage chunk.
    out = asyncio.run(collect(ChatServing.chunks("c", 7, "m", 1, batches(
        [(0, {"text": "Hi", "logprobs": {"content": ENTRIES}, "finish_reason": "stop"})]),
        logprobs=False, include_usage=False)))
    assert [c["choices"][0]["logprobs"] for c in out] == [None, None, None]
    assert all("usage" not in c for c in out)


def test_completion_response_offsets_and_usage_per_prompt() -> None:
    finals = [{"text": "Hi!", "finish_reason": "stop", "usage": USAGE,
               "logprobs": {"content": ENTRIES, "text_offset": [10, 12]}},  # after an echo
              {"text": "Hi!", "usage": USAGE, "logprobs": {"content": ENTRIES}},
              {"text": "x", "finish_reason": "length", "usage": USAGE}]
    r = json.loads(dumps(CompletionServing.response("cmpl-x", 7, "m", 1, typed(finals), True)))
    assert r["object"] == "text_completion" and r["id"] == "cmpl-x"
    assert r["choices"][0]["logprobs"] == {
        "text_offset": [10, 12], "tokens": ["Hi", "!"], "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"Hi": -0.1}, {}]}
    assert r["choices"][1]["logprobs"]["text_offset"] == [0, 2]  # counted when not given
    assert r["choices"][2]["logprobs"]["tokens"] == []
    assert [c["finish_reason"] for c in r["choices"]] == ["stop", "stop", "length"]
    # n=1: three prompts, each counted
    assert r["usage"] == {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}
    two = json.loads(dumps(CompletionServing.response("c", 7, "m", 3, typed(finals), False)))
    assert two["usage"]["prompt_tokens"] == 5  # n=3: one prompt
    assert two["choices"][0]["logprobs"] is None


def test_completion_chunks_offsets_follow_the_text() -> None:
    frames = batches(
        [(0, {"text": "Hi", "logprobs": {"content": ENTRIES[:1]}})],
        [(0, {"text": "!", "logprobs": {"content": ENTRIES[1:]}})],
        [(0, {"text": "", "finish_reason": "stop", "usage": USAGE})])
    out = asyncio.run(collect(CompletionServing.chunks("c", 7, "m", 1, 1, frames, True, True)))
    head = {"id": "c", "object": "text_completion", "created": 7, "model": "m"}
    assert out[0] == {**head, "choices": [{"index": 0, "text": "Hi", "logprobs": {
        "text_offset": [0], "tokens": ["Hi"], "token_logprobs": [-0.1],
        "top_logprobs": [{"Hi": -0.1}]}, "finish_reason": None}]}
    assert out[1]["choices"][0]["logprobs"]["text_offset"] == [2]
    assert out[2] == {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                           "finish_reason": "stop"}]}
    assert out[3] == {**head, "choices": [], "usage": USAGE}
    assert len(out) == 4 and "usage" not in out[0]


class FakeStream:
    def __init__(self, items: list[list[dict[str, Any]]]) -> None:
        self.items = items
        self.closed = False

    async def batches(self) -> AsyncIterator[list[Delta]]:
        for item in self.items:
            yield typed(item)

    async def aclose(self) -> None:
        self.closed = True


class FakeTransport:
    """Answers every generation with the same frames; records the params it was given."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        self.frames = frames
        self.params: list[dict[str, Any]] = []
        self.streams: list[FakeStream] = []

    async def open_stream(self, model: str, params: dict[str, Any],
                          keys: list[str] | None = None, accept: Any = None,
                          caller: Any = None) -> FakeStream:
        self.params.append(params)
        self.streams.append(FakeStream([[f] for f in self.frames]))
        return self.streams[-1]

    async def generate_once(self, model: str, params: dict[str, Any],
                            keys: list[str] | None = None, accept: Any = None,
                            caller: Any = None) -> Delta:
        self.params.append(params)
        return Delta.of({"text": "".join(f.get("text", "") for f in self.frames),
                         **{k: v for f in self.frames for k, v in f.items() if k != "text"}})


def sse_events(body: bytes) -> list[Any]:
    return [e[6:] if e[6:] == b"[DONE]" else json.loads(e[6:])
            for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def test_chat_serving_end_to_end_without_a_server() -> None:
    frames = [{"text": "Hel"}, {"text": "lo", "finish_reason": "stop", "usage": USAGE}]

    async def main() -> None:
        t = table_of(entry("a"))
        fake = FakeTransport(frames)
        serving = ChatServing(t, Pipeline(fake, Limits(request_timeout=5, sse_keepalive=1)),
                              clock=lambda: 42.9)
        body = ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": "s"},
                                                          {"role": "user", "content": "q"}],
                                     n=2, seed=5, max_tokens=9)
        whole = await serving.create(body, "rid", never_gone)
        r = json.loads(dumps(whole))
        assert r["id"] == "chatcmpl-rid" and r["created"] == 42
        assert [c["message"]["content"] for c in r["choices"]] == ["Hello", "Hello"]
        assert [p["seed"] for p in fake.params] == [5, 6]
        assert [p["request_id"] for p in fake.params] == ["rid-0", "rid-1"]
        p = fake.params[0]
        assert p["messages"][0] == {"role": "system", "content": "s"}
        assert p["max_new_tokens"] == 9 and p["delta"] and p["temperature"] == 0.7
        assert p["echo"] is False and p["logprobs"] is None

        streamed = await serving.create(body.model_copy(update={"stream": True}), "rid",
                                        never_gone)
        assert isinstance(streamed, Streamed)
        data = b"".join([b async for b in sse_stream(streamed.chunks, streamed.opening)])
        events = sse_events(data)
        assert events[-1] == b"[DONE]"
        text = {0: "", 1: ""}
        for e in events[:-1]:
            for c in e["choices"]:
                text[c["index"]] += c["delta"].get("content") or ""
        assert text == {0: "Hello", 1: "Hello"}
        assert all(s.closed for s in fake.streams)  # the streams are closed after the end

        with pytest.raises(APIError) as e:
            await serving.create(body.model_copy(update={"model": "n"}), "rid", never_gone)
        assert e.value.status == 404

    asyncio.run(main())


def test_stream_error_frame_becomes_an_error_event() -> None:
    async def main() -> None:
        fake = FakeTransport([{"text": "a"}, {"text": "oops", "error_code": 50001}])
        serving = CompletionServing(table_of(entry("a")), Pipeline(fake))
        streamed = await serving.create(CompletionRequest(model="m", prompt="p", stream=True),
                                        "rid", never_gone)
        assert isinstance(streamed, Streamed)
        events = sse_events(b"".join([b async for b in sse_stream(streamed.chunks,
                                                                  streamed.opening)]))
        assert events[0]["choices"][0]["text"] == "a"
        assert events[1]["error"]["type"] == "server_error" and "oops" in \
            events[1]["error"]["message"]
        assert events[2] == b"[DONE]"

    asyncio.run(main())


class PacedStream:
    """A worker stream whose frames come one by one, `gap` seconds apart, or when `turns` is
    given, that many turns of the event loop apart (a burst read from a socket piece by piece:
    microseconds apart, too close for a timer)."""

    worker = None

    def __init__(self, texts: list[str], gap: float = 0.0, turns: int = 0) -> None:
        self.texts, self.gap, self.turns = texts, gap, turns

    async def batches(self) -> AsyncIterator[list[Delta]]:
        for t in self.texts:
            if self.turns:
                for _ in range(self.turns):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(self.gap)
            yield [Delta(text=t)]

    async def aclose(self) -> None:
        pass


def writes_of(stream: PacedStream) -> list[str]:
    """What `merged` gives to write, each write's texts joined."""
    async def main() -> list[str]:
        return ["".join(f.text for _, f in out) async for out in merged([stream])]

    return asyncio.run(main())


def test_a_burst_of_frames_goes_out_in_a_few_writes_in_order() -> None:
    texts = [f"t{i} " for i in range(16)]
    writes = writes_of(PacedStream(texts, turns=20))
    assert "".join(writes) == "".join(texts)
    assert len(writes) <= 4  # the first at once, the rest of the burst together (not 16)


def test_frames_far_apart_are_each_written_when_they_come() -> None:
    texts = ["a", "b", "c"]
    assert writes_of(PacedStream(texts, 0.1)) == texts  # 100 ms apart: nothing held back


# ---- the transport: failover and in-flight counting, embeddings included -----------------------


@contextlib.asynccontextmanager
async def stub_worker(port: int, embeddings: Callable[[web.Request], Awaitable[web.Response]]
                      ) -> AsyncIterator[web.AppRunner]:
    """A worker's /worker_get_embeddings on a loopback port, in this process."""
    app = web.Application()
    app.router.add_post("/worker_get_embeddings", embeddings)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield runner
    finally:
        await runner.cleanup()


def test_embeddings_fail_over_from_a_refusing_worker_and_count_in_flight() -> None:
    async def main() -> None:
        live_port, dead_port = free_port(), free_port()
        live, dead = f"http://127.0.0.1:{live_port}", f"http://127.0.0.1:{dead_port}"
        emb = {"features": {"embeddings": True, "embedding_dimensions": [3]}}
        # The dead worker (nothing listens on its port) has the shorter queue: tried first.
        t = table_of(entry(live, queue=5, ours=emb), entry(dead, queue=0, ours=emb),
                     entry("http://chat-only", queue=0))
        seen: list[dict[str, int]] = []

        async def embeddings(request: web.Request) -> web.Response:
            seen.append(dict(t.inflight))
            body = await request.json()
            return web.json_response({"embedding": [[0.1, 0.2, 0.3]] * len(body["input"]),
                                      "token_num": 4})

        transport = WorkerTransport(t, httpx.AsyncClient())
        async with stub_worker(live_port, embeddings) as runner:
            data = await transport.embed("m", {"model": "m", "input": ["a", "b"]},
                                         accept=lambda w: w.serves_embeddings)
            assert data["embedding"] == [[0.1, 0.2, 0.3]] * 2 and data["token_num"] == 4
            assert seen == [{live: 1}]  # counted in flight while it answered
            assert t.inflight == {}  # and no longer
            assert dead in t.down  # out of rotation until its next heartbeat
            # Now the live one is the only candidate; when it is gone too, a 503 says so.
            await runner.cleanup()
            with pytest.raises(APIError) as e:
                await transport.embed("m", {"model": "m", "input": ["a"]},
                                      accept=lambda w: w.serves_embeddings)
            assert e.value.status == 503 and live in e.value.message
            assert t.inflight == {}
        await transport.aclose()

    asyncio.run(main())


def test_embeddings_errors_of_a_worker_map_like_generations() -> None:
    async def main() -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        t = table_of(entry(url))

        async def refuse(request: web.Request) -> web.Response:
            return web.json_response({"text": "input too long: at most 256 tokens",
                                      "error_code": 40303})

        transport = WorkerTransport(t, httpx.AsyncClient())
        async with stub_worker(port, refuse):
            with pytest.raises(APIError) as e:
                await transport.embed("m", {"model": "m", "input": ["a"]})
            assert e.value.status == 400 and "at most 256" in e.value.message
            assert t.inflight == {} and t.down == {}
        await transport.aclose()

    asyncio.run(main())
