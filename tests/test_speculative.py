"""Speculative decoding (`--speculative ngram`, llamacpp/speculate.py) changes no answer.

In process, with the real bundled model: greedy answers are byte-identical with and without
speculation on some thirty prompts (edits, quotes and JSON where the n-grams hit, chat, stop
sequences, penalties, logprobs), and so are seeded sampled answers (each accepted draft token
is the token the target sampled at its place, with the same draws). Through real processes: a
worker with `--speculative ngram` behind the API still answers tools, json_schema and stop
sequences right, counts its drafts in its status and its metrics.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from conftest import Procs, Stack, wait_for

CODE = """import json
from pathlib import Path


def load(path: Path) -> dict:
    with path.open() as f:
        return json.load(f)


def total(items: list[dict]) -> float:
    return sum(item["price"] * item["quantity"] for item in items)


def main() -> None:
    order = load(Path("order.json"))
    print("total:", total(order["items"]))
"""
DOC = {"name": "Ada", "city": "London", "languages": ["English", "French"], "age": 36,
       "projects": [{"title": "Analytical Engine notes", "year": 1843}]}
TEXT = ("The lighthouse stood on the northern cape for two hundred years. Its keepers kept a "
        "log of every ship that passed, every storm, and every night the lamp failed.")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


EDITS = [
    user("Rewrite this file with `total` renamed to `order_total`. Output only the code.\n\n"
         + CODE),
    user("Add a docstring to `load` in this file and output the whole file.\n\n" + CODE),
    user("Fix the JSON: change the city to Paris. Output only the JSON.\n\n" + json.dumps(DOC,
                                                                                       indent=2)),
    user("Repeat this text exactly:\n\n" + TEXT),
    user("Quote the first sentence of this text, then the second.\n\n" + TEXT),
    user("Copy this list, sorted: banana, apple, cherry, banana, apple, date."),
]
CHATS = [user(q) for q in (
    "Tell me a story about a dragon.", "What is the capital of France?",
    "Write a haiku about the sea.", "Explain recursion to a child.",
    "List three colours.", "What is 12 times 12?", "Say hello in French and Spanish.",
    "Write a Python function that reverses a string.",
)]
COUNT = "1, 2, 3, 4, 5,"
# (what is asked, GenerationRequest keyword arguments)
CASES: list[tuple[Any, dict[str, Any]]] = (
    [(m, {}) for m in EDITS + CHATS[:4]]
    + [(m, {"stop": ["\n"]}) for m in EDITS[:3] + CHATS[:2]]
    + [(m, {"frequency_penalty": 1.0}) for m in EDITS[:2]]
    + [(m, {"logprobs": 2, "max_new_tokens": 8}) for m in EDITS[:2] + CHATS[:1]]
    + [(COUNT, {}), (COUNT, {"stop": [" 9"]}), ("a b c a b c a b", {})]
)


def outputs(mode: str, cases: list[tuple[Any, dict[str, Any]]],
            tokens: int = 32) -> tuple[list[tuple[Any, ...]], Any]:
    """Each case's (text, finish reason, tokens, logprobs) on a fresh engine, one at a time,
    and the engine's speculation status."""
    from llmrelay.worker.engines.base import GenerationRequest
    from llmrelay.worker.engines.llamacpp import Options, load
    from llmrelay.worker.engines.llamacpp.speculate import Settings
    from llmrelay.worker.models import resolve

    engine = load(Options(resolve("smollm2").path, context_length=2048, n_threads=2,
                          parallel=1, speculation=Settings(mode)))

    async def one(asked: Any, kw: dict[str, Any]) -> tuple[Any, ...]:
        where = {"messages": asked} if isinstance(asked, list) else {"prompt": asked}
        req = GenerationRequest(**where, **{"max_new_tokens": tokens, "temperature": 0, **kw})
        text, reason, n, lps, drafted = "", None, 0, [], None
        async for c in engine.generate(req):
            text += c.text
            reason, n = c.finish_reason or reason, c.completion_tokens
            lps += [e["logprob"] for e in c.logprobs or []]
            drafted = c.drafted or drafted
        return text, reason, n, lps, drafted

    async def go() -> list[tuple[Any, ...]]:
        return [await one(asked, kw) for asked, kw in cases]

    try:
        return asyncio.run(go()), engine.status()["speculative"]
    finally:
        engine.close()


@pytest.mark.timeout(1800)  # some 2,000 tokens, one request at a time, on a shared CPU
def test_greedy_and_seeded_answers_are_the_same_with_and_without_ngram_speculation() -> None:
    seeded = [(m, {"temperature": 0.8, "top_p": 0.95, "seed": 7 + i})
              for i, m in enumerate(EDITS[:3] + CHATS[:2])]
    cases = CASES + seeded
    plain, off = outputs("off", cases)
    spec, on = outputs("ngram", cases)
    assert off["proposed"] == 0 and on["mode"] == "ngram"
    for (asked, kw), a, b in zip(cases, plain, spec, strict=True):
        assert a[:4] == b[:4], (asked, kw)
    # the cases did what they say, so that the comparison means something
    assert all(r[1] in ("stop", "length") and r[2] > 0 for r in plain)
    assert any(r[1] == "stop" and r[2] < 32 for r in plain[len(EDITS + CHATS[:4]):])
    assert all(len(r[3]) == r[2] for r, (_, kw) in zip(plain, cases, strict=True)
               if "logprobs" in kw)
    # drafts were made and accepted where n-grams hit, and none for logprobs
    assert on["accepted"] > 0 and on["proposed"] >= on["accepted"]
    edits = spec[:len(EDITS)]
    assert sum(r[4][1] for r in edits if r[4]) > 0
    assert all(r[4] is None for r, (_, kw) in zip(spec, cases, strict=True) if "logprobs" in kw)
    # a seeded request is reproducible with speculation
    again, _ = outputs("ngram", seeded)
    assert [r[:3] for r in again] == [r[:3] for r in spec[len(CASES):]]


def test_a_worker_with_ngram_speculation_answers_tools_schemas_and_stops(stack: Stack,
                                                                         procs: Procs) -> None:
    """Through the API with the official SDK: a worker with `--speculative ngram` gives the
    plain worker's greedy answers, keeps tool calls and json_schema answers valid and stop
    sequences honoured, and reports its drafts in its status and metrics."""
    proc, worker = procs.worker(stack.controller, names="smol-spec",
                                extra=("--speculative", "ngram", "--num-speculative-tokens", "6"))
    assert "speculative decoding: ngram" in proc.log()
    client = stack.client()
    wait_for(lambda: "smol-spec" in {m.id for m in client.models.list().data}, 30,
             "the worker in the API")
    stack.wait_idle()
    quote = EDITS[3]

    def ask(model: str, **kw: Any) -> Any:
        return client.chat.completions.create(model=model, messages=quote, temperature=0,
                                              max_tokens=48, **kw)

    for kw in ({}, {"stop": ["keepers"]}):
        plain, spec = ask("smol", **kw), ask("smol-spec", **kw)
        assert spec.choices[0].message.content == plain.choices[0].message.content
        assert spec.choices[0].finish_reason == plain.choices[0].finish_reason
    assert "keepers" not in (ask("smol-spec", stop=["keepers"]).choices[0].message.content or "")

    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="smol-spec", messages=EDITS[2], temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert set(json.loads(r.choices[0].message.content or "")) == {"city"}

    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    r = client.chat.completions.create(
        model="smol-spec", messages=user("What is the weather in Paris?"), tools=[tool],
        tool_choice="required", temperature=0, max_tokens=60)
    call = (r.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)

    status = httpx.post(worker + "/worker_get_status", timeout=10).json()
    spec_status = status["llmrelay"]["speculative"]
    assert spec_status["mode"] == "ngram" and spec_status["accepted"] > 0
    metrics = httpx.get(worker + "/metrics", timeout=10).text
    accepted = [line for line in metrics.splitlines()
                if line.startswith("llmrelay_worker_speculative_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0
    assert "draft tokens accepted" in proc.log()
