"""The `prefix` dispatch method: a conversation's next turn goes to the worker holding its cache."""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from conftest import Procs, registered, wait_for
from llmrelay.dispatch import Affinity, conversation_keys, pick


@dataclass
class W:
    name: str
    speed: float = 1
    queue_length: int = 0


def test_prefix_policy_prefers_the_conversations_worker_unless_overloaded() -> None:
    a, b = W("a"), W("b", queue_length=1)
    rng = random.Random(0)
    # with a preferred worker, it is kept even when another is less loaded, within the slack
    assert all(pick("prefix", [a, b], rng, preferred="b") is b for _ in range(20))
    # overloaded (more than 2 above the least loaded): back to shortest_queue
    b.queue_length = 3
    assert pick("prefix", [a, b], rng, preferred="b") is a
    assert pick("prefix", [a, b], rng, extra_load={"a": 2}, preferred="b") is b
    # no preferred worker, or one that is gone: shortest_queue
    assert pick("prefix", [a, b], rng) is a
    assert pick("prefix", [a, b], rng, preferred="gone") is a


def test_affinity_finds_the_longest_earlier_turn() -> None:
    turn1 = [{"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    other = [{"role": "user", "content": "something else"}]
    k1, k2 = conversation_keys(turn1), conversation_keys(turn2)
    assert k2[0] == k1[0] and len(set(k2)) == 3
    aff = Affinity(capacity=2)
    aff.remember(k1, "w1")
    assert aff.lookup(k2) == "w1"
    assert aff.lookup(conversation_keys(other)) is None
    aff.remember(k2, "w2")
    assert aff.lookup(k2 + ["x"]) == "w2"  # the longest known prefix wins
    aff.remember(conversation_keys(other), "w3")
    assert len(aff.served) == 2  # bounded: the least recently used is dropped


def test_conversation_turns_stay_on_one_worker(procs: Procs) -> None:
    _, controller = procs.controller(extra=("--dispatch-method", "prefix"))
    workers = [procs.worker(controller, "smol", wait=False)[1] for _ in range(2)]
    for w in workers:
        wait_for(lambda w=w: registered(controller, w), 60, f"worker {w}")
    _, api = procs.api(controller)
    wait_for(lambda: len(httpx.get(controller + "/worker_table").json()["workers"]) == 2, 10)

    def served() -> list[int]:
        return [httpx.post(w + "/worker_get_status").json()["llmrelay"]["served"]
                for w in workers]

    for conversation in range(2):
        before = served()
        messages = [{"role": "user", "content": f"Say a number, conversation {conversation}."}]
        for _turn in range(4):
            r = httpx.post(api + "/v1/chat/completions", timeout=60, json={
                "model": "smol", "messages": messages, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            messages += [{"role": "assistant",
                          "content": r.json()["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "And another one."}]
        after = served()
        # all four turns on one worker (shortest_queue would spread them at random)
        assert sorted(x - y for x, y in zip(after, before, strict=True)) == [0, 4]
