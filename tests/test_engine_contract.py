"""Unit tests of what every engine shares: the typed worker wire (GenerateParams, frames, the
logprob converters) and the sequence logic of threaded engines (threaded.ThreadedEngine: prompt
rules, echo, UTF-8, stop strings, stop tokens, length, hand-off to the event loop).

The sequence logic is driven by a byte-level engine written here: each token is one byte of
UTF-8 and 256 ends a generation. Its "model" answers a script given per test, so each rule is
checked on exact token sequences, with no model library.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import pytest

from llmrelay.protocol import (
    ErrorCode,
    Features,
    GenerateParams,
    ParamError,
    entries_of,
    from_legacy,
    logprob_entry,
    text_offsets,
    to_legacy,
)
from llmrelay.worker.engines.base import Chunk, EngineError, GenerationRequest
from llmrelay.worker.engines.threaded import Generation, ThreadedEngine
from llmrelay.worker.service import Framer

END = 256


class ByteEngine(ThreadedEngine):
    """Tokens are UTF-8 bytes; the scheduler thread answers each request with `script`."""

    name = "bytes"

    def __init__(self, script: list[int], context: int = 64) -> None:
        super().__init__()
        self.script = script
        self.context = context
        self.inbox: deque[Generation] = deque()
        self.started = threading.Event()  # the scheduler has taken a request
        self.step = threading.Event()  # set by a test to let the scheduler go on
        self.step.set()
        self.permits: threading.Semaphore | None = None  # when set: one token per permit
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def context_length(self) -> int:
        return self.context

    def features(self) -> Features:
        return Features(continuation=True)

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        return list(text.encode())

    def detokenize(self, tokens: list[int]) -> str:
        return bytes(tokens).decode(errors="replace")

    def vocab_size(self) -> int:
        return 257

    def is_end(self, token: int) -> bool:
        return token == END

    def piece(self, gen: Generation, token: int) -> bytes:
        return bytes([token])

    def submit(self, gen: Generation) -> None:
        self.inbox.append(gen)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.inbox:
                    self.cond.wait()
                if self.closed:
                    return
                gen = self.inbox.popleft()
            self.started.set()
            for token in self.script[len(gen.forced):]:
                while gen.replaying:  # resuming: the engine generates the earlier tokens again
                    self.take(gen, gen.next_forced())  # type: ignore[arg-type]
                self.step.wait(5)
                if self.permits is not None:
                    self.permits.acquire(timeout=5)
                if self.take(gen, token) is not None:
                    break
                self.wake()
            else:
                self.finish(gen, "stop")
            self.wake()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(5)


def run(engine: ByteEngine, **kw: object) -> list[Chunk]:
    async def go() -> list[Chunk]:
        return [c async for c in engine.generate(GenerationRequest(**kw))]  # type: ignore[arg-type]

    try:
        return asyncio.run(go())
    finally:
        engine.close()


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def script(text: str, end: bool = True) -> list[int]:
    return list(text.encode()) + ([END] if end else [])


# ---- the sequence rules ----------------------------------------------------------------------


def test_text_arrives_whole_characters_and_ends_at_the_end_token() -> None:
    chunks = run(ByteEngine(script("héllo ☃ ok")), prompt="hi", max_new_tokens=50)
    assert text_of(chunks) == "héllo ☃ ok"
    assert "\ufffd" not in text_of(chunks)  # a character split over tokens is never cut
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (2, len("héllo ☃ ok".encode()))


def test_stop_string_is_cut_and_a_partial_one_is_released() -> None:
    chunks = run(ByteEngine(script("a ENb ENDc")), prompt="x", stop=["END"])
    assert text_of(chunks) == "a ENb "  # "EN" held back, then released when "b" followed
    assert chunks[-1].finish_reason == "stop"
    assert not any(c.text.endswith(("E", "EN")) for c in chunks)  # never a partial stop out


def test_stop_token_ids_and_length() -> None:
    assert text_of(run(ByteEngine(script("abcdef")), prompt="x",
                       stop_token_ids=[ord("d")])) == "abc"
    chunks = run(ByteEngine(script("abcdef")), prompt="x", max_new_tokens=4)
    assert text_of(chunks) == "abcd" and chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 4


def test_max_tokens_is_clamped_to_the_room_left_in_the_context() -> None:
    chunks = run(ByteEngine(script("abcdefghij"), context=8), prompt="12345", max_new_tokens=None)
    assert text_of(chunks) == "abc" and chunks[-1].finish_reason == "length"


def test_prompt_rules_and_echo() -> None:
    with pytest.raises(EngineError) as e:
        run(ByteEngine(script("a"), context=8), prompt="123456789")
    assert e.value.code == ErrorCode.CONTEXT_OVERFLOW and "maximum context length is 8" in str(e.value)
    with pytest.raises(EngineError) as e:
        run(ByteEngine(script("a")), prompt="")
    assert e.value.code == ErrorCode.PARAM_OUT_OF_RANGE
    with pytest.raises(EngineError) as e:
        run(ByteEngine(script("a")), prompt_token_ids=[1, 300])
    assert e.value.code == ErrorCode.PARAM_OUT_OF_RANGE and "300" in str(e.value)
    echoed = run(ByteEngine(script("ok")), prompt="say", echo=True)
    assert echoed[0].text == "say" and echoed[0].completion_tokens == 0
    assert text_of(echoed) == "sayok"
    none = run(ByteEngine(script("ok")), prompt="say", max_new_tokens=0)
    assert text_of(none) == "" and none[-1].finish_reason == "length"
    with pytest.raises(EngineError) as e:
        run(ByteEngine(script("ok")), prompt="x", logprobs=1)  # this engine declares none
    assert "logprobs" in str(e.value)


def test_a_reader_that_falls_behind_gets_the_waiting_chunks_merged() -> None:
    engine = ByteEngine(script("abcdef"))

    async def go() -> list[Chunk]:
        out = []
        async for c in engine.generate(GenerationRequest(prompt="x")):
            out.append(c)
            await asyncio.sleep(0.05)  # the scheduler runs ahead meanwhile
        return out

    try:
        chunks = asyncio.run(go())
    finally:
        engine.close()
    assert text_of(chunks) == "abcdef" and chunks[-1].finish_reason == "stop"
    assert len(chunks) < 7  # not one chunk per token
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6


def test_leaving_early_stops_the_generation() -> None:
    engine = ByteEngine(script("abcdefgh"))
    engine.step.clear()  # the scheduler waits for each token

    async def go() -> None:
        agen = engine.generate(GenerationRequest(prompt="x"))
        engine.step.set()
        first = await agen.__anext__()
        assert first.text
        engine.step.clear()
        await agen.aclose()  # the reader leaves: the generation's cancel flag is set
        engine.step.set()

    try:
        asyncio.run(go())
        engine.thread.join(0.1)
        assert engine.started.is_set()
    finally:
        engine.close()


def test_a_resumed_generation_continues_exactly_where_the_frames_stopped() -> None:
    """Cut a generation after any chunk (a worker died there): another engine given the prompt
    and the token ids received so far sends exactly the rest of the text (a character split
    over tokens and a held-back partial stop string included), and counts the whole answer."""
    text = "ab héllo ENDING ☃ END rest"
    engine = ByteEngine(script(text))
    engine.permits = threading.Semaphore(0)

    async def slowly() -> list[Chunk]:  # one token at a time: a chunk per token where it can
        out: list[Chunk] = []

        async def read() -> None:
            async for c in engine.generate(GenerationRequest(prompt="x", stop=["END "])):
                out.append(c)

        reader = asyncio.create_task(read())
        while not reader.done():
            engine.permits.release()  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
        await reader
        return out

    try:
        full = asyncio.run(slowly())
    finally:
        engine.close()
    expected = text_of(full)
    assert expected == "ab héllo ENDING ☃ "
    received_ids: list[int] = []
    received_text = ""
    for chunk in full[:-1]:
        received_ids += chunk.token_ids
        received_text += chunk.text
        rest = run(ByteEngine(script(text)), prompt="x", stop=["END "],
                   generated=list(received_ids))
        assert received_text + text_of(rest) == expected, (received_ids, text_of(rest))
        assert rest[-1].completion_tokens == full[-1].completion_tokens
        assert rest[-1].finish_reason == "stop"
    assert received_ids and len(full) > 10  # many cut points, mid-character ones included


# ---- the typed wire --------------------------------------------------------------------------


def test_generate_params_validate_once_with_fastchat_codes() -> None:
    p = GenerateParams.parse({"prompt": "hi", "temperature": 0, "stop": "x", "max_new_tokens": 3,
                              "images": [], "use_beam_search": False})
    assert p.stops == ["x"] and p.temperature == 0 and p.echo is True  # FastChat's default
    req = GenerationRequest.from_params(p, ["<|end|>"], "rid")
    assert req.stop == ["x"] and req.request_id == "rid" and req.temperature == 0.0
    chat = GenerationRequest.from_params(GenerateParams.parse(
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}), ["<|end|>"])
    assert chat.stop == ["x", "<|end|>"] and chat.prompt is None
    for body, code, where in (
            ({"prompt": 5}, ErrorCode.VALIDATION_TYPE_ERROR, "prompt"),
            ({"prompt": "x", "temperature": "hot"}, ErrorCode.VALIDATION_TYPE_ERROR, "temperature"),
            ({"prompt": "x", "seed": True}, ErrorCode.VALIDATION_TYPE_ERROR, "seed"),
            ({"prompt": "x", "max_new_tokens": -1}, ErrorCode.PARAM_OUT_OF_RANGE, "max_new_tokens"),
            ({"prompt": "x", "logprobs": 21}, ErrorCode.PARAM_OUT_OF_RANGE, "logprobs"),
            ({"prompt_token_ids": [1, True]}, ErrorCode.VALIDATION_TYPE_ERROR, "prompt_token_ids"),
            ({}, ErrorCode.VALIDATION_TYPE_ERROR, "prompt"),
            ([1, 2], ErrorCode.VALIDATION_TYPE_ERROR, "JSON object")):
        with pytest.raises(ParamError) as e:
            GenerateParams.parse(body)
        assert e.value.code == code and where in str(e.value), (body, str(e.value))


def test_logprob_converters_round_trip() -> None:
    entries = [logprob_entry("He", -0.5, None, [("He", -0.5), ("I", -1.5)]),
               logprob_entry("llo", -0.25, b"llo"), logprob_entry("é", -2.0)]
    offsets = text_offsets(entries, 3)
    assert offsets == [3, 5, 8]
    legacy = to_legacy(entries, offsets)
    assert legacy == {"text_offset": [3, 5, 8], "tokens": ["He", "llo", "é"],
                      "token_logprobs": [-0.5, -0.25, -2.0],
                      "top_logprobs": [{"He": -0.5, "I": -1.5}, {}, {}]}
    back, given = from_legacy(dict(legacy))
    assert back == entries and given == offsets
    later, given = from_legacy(dict(legacy), skip=2)
    assert later == entries[2:] and given == [8]
    assert entries_of({"content": entries}) == entries
    assert entries_of(legacy) == entries and entries_of(None) == []
    # FastChat's first token has no logprob; its top_logprobs are empty dicts.
    fastchat = {"tokens": ["a", "b"], "token_logprobs": [None, -1.0], "top_logprobs": [{}, {}]}
    assert [e["logprob"] for e in from_legacy(fastchat)[0]] == [0.0, -1.0]
    assert from_legacy(fastchat)[1] is None


def test_framer_cumulative_delta_and_whole_answer() -> None:
    lp = [logprob_entry("a", -1.0)]
    chunks = [Chunk("say", 3, 0), Chunk("a", 3, 1, None, lp), Chunk("b", 3, 2, "stop",
                                                                     [logprob_entry("b", -2.0)])]
    cumulative, delta = Framer(False), Framer(True)
    frames = [cumulative.make(c) for c in chunks]
    assert [f["text"] for f in frames] == ["say", "saya", "sayab"]
    assert frames[-1]["logprobs"]["text_offset"] == [3, 4]  # type: ignore[index]
    assert frames[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    deltas = [delta.make(c) for c in chunks]
    assert [f["text"] for f in deltas] == ["say", "a", "b"]
    assert deltas[0]["logprobs"] is None and deltas[1]["logprobs"] == {"content": lp}
    whole = delta.whole()
    assert whole["text"] == "sayab" and whole["finish_reason"] == "stop"
    assert whole["logprobs"] == {"content": lp + [logprob_entry("b", -2.0)], "text_offset": [3, 4]}
    assert cumulative.whole() == frames[-1]
