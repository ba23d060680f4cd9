"""Speculative decoding (`--speculative ngram|draft`, llamacpp/speculate.py, draft.py) changes
no answer.

In process, with the real bundled model: greedy answers are byte-identical with and without
speculation on some thirty prompts (edits, quotes and JSON where the n-grams hit, chat, stop
sequences, penalties, logprobs), and so are seeded sampled answers (each accepted draft token
is the token the target sampled at its place, with the same draws), by n-gram lookup and with
SmolLM2 as its own draft model (a functional check: a draft that always agrees). Through real
processes: a worker with `--speculative ngram` behind the API still answers tools, json_schema
and stop sequences right, counts its drafts in its status and its metrics; a worker with SmolLM2
as its draft model gives the plain worker's answers (chat, stop sequences, json_schema, tools,
logprobs), shows a high acceptance rate in its status, metrics and `llmrelay status`; the
bundled Gemma as a draft for SmolLM2 (another vocabulary) stops the worker with the reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
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
SEEDED: list[tuple[Any, dict[str, Any]]] = [
    (m, {"temperature": 0.8, "top_p": 0.95, "seed": 7 + i})
    for i, m in enumerate(EDITS[:3] + CHATS[:2])]
Outputs = tuple[list[tuple[Any, ...]], Any]


def outputs(mode: str, cases: list[tuple[Any, dict[str, Any]]],
            tokens: int = 32) -> Outputs:
    """Each case's (text, finish reason, tokens, logprobs) on a fresh engine, one at a time,
    and the engine's speculation status."""
    from llmrelay.worker.engines.base import GenerationRequest
    from llmrelay.worker.engines.llamacpp import Options, load
    from llmrelay.worker.engines.llamacpp.speculate import Settings
    from llmrelay.worker.models import resolve

    path = resolve("smollm2").path  # with --speculative draft, its own draft model too
    engine = load(Options(path, context_length=2048, n_threads=2, parallel=1,
                          speculation=Settings(mode, draft_model=path if mode == "draft" else None)))

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


@pytest.fixture(scope="module")
def without() -> Outputs:
    """CASES + SEEDED without speculation, for the comparisons with both kinds of drafts."""
    return outputs("off", CASES + SEEDED)


@pytest.mark.timeout(1800)  # some 2,000 tokens, one request at a time, on a shared CPU
def test_greedy_and_seeded_answers_are_the_same_with_and_without_ngram_speculation(
        without: Outputs) -> None:
    seeded = SEEDED
    cases = CASES + seeded
    plain, off = without
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


@pytest.mark.timeout(1800)
def test_greedy_and_seeded_answers_are_the_same_with_a_draft_model(without: Outputs) -> None:
    """SmolLM2 as its own draft model: every answer as without speculation, and (a draft of
    the same weights) most draft tokens accepted."""
    cases = CASES + SEEDED
    plain, _ = without
    spec, on = outputs("draft", cases)
    for (asked, kw), a, b in zip(cases, plain, spec, strict=True):
        assert a[:4] == b[:4], (asked, kw)
    assert on["mode"] == "draft" and on["draft_model"].startswith("SmolLM2")
    # Greedy, with no stop sequence or penalty, every draft token is checked (none is drafted
    # past the length limit or an end token) and, the draft being the target, most are
    # kept; sampled answers reject greedy drafts often, a stop sequence cuts a draft short. (How
    # many tokens are drafted depends on the measured step costs; the first case's first step
    # drafts before any is measured.) Not all: the draft reads its prompt in other batch sizes
    # than the target's cells were computed in, so a near-tie may fall the other way (a full
    # suite run measured 0.898 through the API; 0.75 leaves room and still needs a draft in
    # step with the target).
    greedy = [r[4] for r in spec[:len(EDITS + CHATS[:4])] if r[4]]
    proposed, accepted = sum(d[0] for d in greedy), sum(d[1] for d in greedy)
    assert proposed > 0 and accepted >= 0.75 * proposed
    assert all(r[4] is None for r, (_, kw) in zip(spec, cases, strict=True) if "logprobs" in kw)


@pytest.fixture(scope="module")
def draft_worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """A worker serving SmolLM2 as `smol-draft` with SmolLM2 as its draft model, registered
    with the shared stack (one for the module)."""
    procs = Procs(tmp_path_factory.mktemp("draft-worker"))
    try:
        proc, url = procs.worker(stack.controller, names="smol-draft", extra=(
            "--speculative", "draft", "--draft-model-path", "smollm2",
            "--num-speculative-tokens", "6"))
        client = stack.client()
        wait_for(lambda: "smol-draft" in {m.id for m in client.models.list().data}, 30,
                 "the draft worker in the API")
        yield proc, url
    finally:
        procs.stop_all()


def test_a_worker_with_a_draft_model_gives_the_plain_workers_answers(
        stack: Stack, draft_worker: tuple[Any, str]) -> None:
    """Through the API with the official SDK: chat, stop sequences, json_schema, a tool call
    and logprobs answered by the draft-model worker exactly as by the plain `smol` workers;
    its status and metrics show the drafts, most accepted."""
    proc, worker = draft_worker
    assert "speculative decoding: draft with SmolLM2" in proc.log()
    client = stack.client()
    stack.wait_idle()
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    asks: list[tuple[Any, dict[str, Any]]] = [
        (EDITS[3], {}), (CHATS[0], {}), (CHATS[1], {}), (EDITS[0], {"stop": ["\n"]}),
        (EDITS[3], {"stop": ["keepers"]}),
        (EDITS[2], {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "c", "schema": schema}}}),
        (user("What is the weather in Paris?"), {"tools": [tool], "tool_choice": "required"}),
        (CHATS[1], {"logprobs": True, "top_logprobs": 2}),
    ]

    def ask(model: str, messages: Any, kw: dict[str, Any]) -> Any:
        r = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=48, **kw)
        c = r.choices[0]
        calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        lps = [(e.token, e.logprob) for e in (c.logprobs.content or [])] if c.logprobs else None
        return c.message.content, c.finish_reason, calls, lps

    for i, (messages, kw) in enumerate(asks):
        assert ask("smol-draft", messages, kw) == ask("smol", messages, kw), (messages, kw)
        if i == 2:  # greedy answers with no stop sequence: the draft is the target's own
            spec = httpx.post(worker + "/worker_get_status", timeout=10).json()["llmrelay"][
                "speculative"]
            assert spec["mode"] == "draft" and spec["proposed"] > 0
            assert spec["acceptance_rate"] >= 0.9
    got = ask("smol-draft", *asks[5])
    assert set(json.loads(got[0])) == {"city"}
    assert ask("smol-draft", *asks[6])[2][0][0] == "get_weather"
    assert ask("smol-draft", *asks[7])[3]

    metrics = httpx.get(worker + "/metrics", timeout=10).text
    accepted = [line for line in metrics.splitlines()
                if line.startswith("llmrelay_worker_speculative_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0
    assert "draft tokens accepted" in proc.log()


def test_llmrelay_status_shows_the_draft_workers_acceptance_rate(
        stack: Stack, draft_worker: tuple[Any, str]) -> None:
    """`llmrelay status` against the stack's controller: the draft worker's row says `draft`
    and its acceptance so far, as the worker's own status has it (from its heartbeat); the
    plain workers' rows say nothing."""
    _, worker = draft_worker
    client = stack.client()
    client.chat.completions.create(model="smol-draft", messages=EDITS[3], temperature=0,
                                   max_tokens=24)
    spec = httpx.post(worker + "/worker_get_status", timeout=10).json()["llmrelay"]["speculative"]
    assert spec["proposed"] > 0
    expected = (f"draft {spec['accepted'] / spec['proposed']:.0%} "
                f"({spec['accepted']}/{spec['proposed']})")
    found: list[str] = []

    def shown() -> bool:
        out = subprocess.run([sys.executable, "-m", "llmrelay.cli", "status",
                              "--controller-address", stack.controller],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        found[:] = lines
        header = next(line for line in lines if line.startswith("MODELS"))
        row = next(line for line in lines if line.startswith("smol-draft "))
        return "SPECULATIVE" in header and row.endswith(expected)

    wait_for(shown, 30, f"`{expected}` in `llmrelay status`")
    for line in found:
        if line.startswith("smol ") or line.startswith("gemma "):
            assert line.rstrip().endswith("-")


def test_a_draft_model_of_another_vocabulary_is_refused_at_start(stack: Stack,
                                                                 procs: Procs) -> None:
    """Gemma (262,144 tokens, SentencePiece) cannot draft for SmolLM2 (49,152, BPE): the
    worker exits non-zero and its log names both models and why."""
    proc, _ = procs.worker(stack.controller, names="smol-bad-draft", wait=False, extra=(
        "--speculative", "draft", "--draft-model-path", "gemma3-270m"))
    assert proc.proc is not None
    rc = proc.proc.wait(timeout=120)
    log = proc.log()
    assert rc != 0, log
    assert re.search(r"cannot start the worker: --draft-model-path: the draft model "
                     r"gemma-3-270m\S*\.gguf cannot draft for the model SmolLM2\S*\.gguf: ", log), log
    assert "vocabulary" in log
