"""The synthetic engine (router benchmarks and fault tests only): its contract, and a real worker
started with `--engine synthetic` serving the full stack and FastChat's cumulative protocol."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx

from conftest import Procs, api_models, wait_for
from llmrelay.config import add_worker_args
from llmrelay.worker.engines.base import GenerationRequest
from llmrelay.worker.engines.synthetic import SyntheticEngine


def run(req: GenerationRequest) -> list:
    async def go() -> list:
        return [c async for c in SyntheticEngine().generate(req)]

    return asyncio.run(go())


def test_fixed_words_one_per_token_up_to_max_new_tokens() -> None:
    chunks = run(GenerationRequest(prompt="a b c", max_new_tokens=4))
    assert "".join(c.text for c in chunks) == "The quick brown fox"
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4, 4]
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].prompt_tokens == 3


def test_stop_string_cancel_and_echo() -> None:
    chunks = run(GenerationRequest(prompt="x", max_new_tokens=9, stop=[" fox"]))
    assert "".join(c.text for c in chunks) == "The quick brown"
    assert chunks[-1].finish_reason == "stop"

    async def leave_after_one() -> list:  # the reader leaves: the generation stops
        agen = SyntheticEngine().generate(GenerationRequest(prompt="x", max_new_tokens=9))
        first = await agen.__anext__()
        await agen.aclose()
        return [first, *[c async for c in agen]]

    assert [c.text for c in asyncio.run(leave_after_one())] == ["The"]
    echoed = run(GenerationRequest(prompt="hello there", max_new_tokens=1, echo=True))
    assert echoed[0].text == "hello there"


def test_never_the_default_engine() -> None:
    p = argparse.ArgumentParser()
    add_worker_args(p)
    args = p.parse_args([])
    assert args.engine == "auto"


def test_synthetic_worker_through_the_stack(procs: Procs) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "synth", extra=("--engine", "synthetic"))
    _, api = procs.api(controller)
    wait_for(lambda: api_models(api) == {"synth"}, 30, "the synthetic model in the API")
    status = httpx.post(worker + "/worker_get_status").json()
    assert status["llmrelay"]["engine"] == "synthetic"
    r = httpx.post(api + "/v1/chat/completions", json={
        "model": "synth", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "The quick brown fox jumps"
    assert body["usage"]["completion_tokens"] == 5
    # FastChat's protocol: cumulative text in NUL-delimited frames, and a conversation template.
    raw = httpx.post(worker + "/worker_generate_stream",
                     json={"prompt": "hi", "max_new_tokens": 3, "echo": False}).content
    frames = [json.loads(f) for f in raw.split(b"\0") if f]
    assert frames[-1]["text"] == "The quick brown"
    conv = httpx.post(worker + "/worker_get_conv_template").json()["conv"]
    assert conv["roles"]
