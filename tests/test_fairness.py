"""The worker's fair queue (worker/fairness.py), driven without a server and with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from llmrelay.worker.fairness import FairQueue


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def admitted_order(q: FairQueue, requests: list[tuple[str, str]], serve: int = 10) -> list[str]:
    """Queue `requests` (key, priority) behind one running request; release one at a time,
    charging each admitted request `serve` generated tokens; returns the keys in admission order."""
    await q.acquire("first")
    order: list[str] = []

    async def one(key: str, priority: str) -> None:
        await q.acquire(key, priority)
        order.append(key)

    tasks = [asyncio.create_task(one(k, p)) for k, p in requests]
    await asyncio.sleep(0)
    for _ in requests:
        q.release()
        await asyncio.sleep(0)
        q.charge(order[-1], prompt_tokens=5, completion_tokens=serve)
    await asyncio.gather(*tasks)
    return order


def test_a_flooding_key_cannot_starve_a_light_one() -> None:
    q = FairQueue(limit=1)
    q.charge("A", completion_tokens=100)  # A has been served before
    order = run(admitted_order(q, [("A", "interactive")] * 6 + [("B", "interactive")]))
    assert order.index("B") <= 1  # B goes first or right after one of A's
    assert order.count("A") == 6


def test_keys_alternate_when_both_flood() -> None:
    q = FairQueue(limit=1)
    order = run(admitted_order(q, [("A", "interactive")] * 4 + [("B", "interactive")] * 4))
    assert order[:4].count("A") == 2 and order[:4].count("B") == 2


def test_idle_time_banks_no_credit() -> None:
    q = FairQueue(limit=1)
    q.charge("busy", completion_tokens=1000)

    async def go() -> None:
        await q.acquire("x")
        waiter = asyncio.create_task(q.acquire("busy"))
        await asyncio.sleep(0)
        newcomer = asyncio.create_task(q.acquire("new"))
        await asyncio.sleep(0)
        # "new" never ran: it is lifted to the least waiting counter, not left at 0
        assert q.counters["new"] == pytest.approx(q.counters["busy"])
        assert q.counters["new"] > 0
        q.release()
        await asyncio.sleep(0)
        q.release()
        await asyncio.gather(waiter, newcomer)

    run(go())


def test_interactive_before_batch_and_batch_ages_in() -> None:
    clock = Clock()
    q = FairQueue(limit=1, aging=30, clock=clock)
    order = run(admitted_order(q, [("a", "batch"), ("b", "interactive"), ("c", "batch")]))
    assert order[0] == "b"

    clock2 = Clock()
    q2 = FairQueue(limit=1, aging=30, clock=clock2)

    async def aged() -> list[str]:
        await q2.acquire("x")
        order: list[str] = []

        async def one(k: str, p: str) -> None:
            await q2.acquire(k, p)
            order.append(k)

        t1 = asyncio.create_task(one("old-batch", "batch"))
        await asyncio.sleep(0)
        clock2.t = 31  # the batch request has waited past the aging period
        t2 = asyncio.create_task(one("new-interactive", "interactive"))
        await asyncio.sleep(0)
        q2.release()
        await asyncio.sleep(0)
        q2.release()
        await asyncio.gather(t1, t2)
        return order

    assert run(aged())[0] == "old-batch"  # equal class now; older first


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    q = FairQueue(limit=1)

    async def go() -> None:
        await q.acquire("a")
        t = asyncio.create_task(q.acquire("b"))
        await asyncio.sleep(0)
        assert len(q.waiting) == 1
        t.cancel()
        await asyncio.sleep(0)
        assert q.waiting == []
        q.release()
        assert q.running == 0
        await q.acquire("c")
        assert q.running == 1

    run(go())


def test_reserve_lets_a_key_with_nothing_running_start_at_once() -> None:
    q = FairQueue(limit=2, reserve=1)

    async def go() -> None:
        await q.acquire("A")
        await q.acquire("A")
        a3 = asyncio.create_task(q.acquire("A"))  # A alone never goes past the limit
        await asyncio.sleep(0)
        assert q.running == 2 and len(q.waiting) == 1
        await asyncio.wait_for(q.acquire("B"), 1)  # nothing of B's runs: a reserve place
        assert q.running == 3
        c = asyncio.create_task(q.acquire("C"))  # the reserve is taken: C waits
        await asyncio.sleep(0)
        assert len(q.waiting) == 2 and not c.done()
        q.release("B")  # back to the limit: only a key with nothing running may go past it
        await asyncio.sleep(0)
        assert c.done() and not a3.done() and q.running == 3
        q.release("A")  # at the limit (A and C run): A's waiter still waits
        await asyncio.sleep(0)
        assert not a3.done() and q.running == 2
        q.release("A")  # below it: A's waiter runs
        await asyncio.sleep(0)
        assert a3.done() and q.running_by_key == {"A": 1, "C": 1}
        for k in ("A", "C"):
            q.release(k)
        assert q.running == 0 and q.running_by_key == {}

    run(go())


def test_without_a_reserve_every_key_waits_for_the_limit() -> None:
    q = FairQueue(limit=1)

    async def go() -> None:
        await q.acquire("A")
        b = asyncio.create_task(q.acquire("B"))
        await asyncio.sleep(0)
        assert not b.done()
        q.release("A")
        await asyncio.sleep(0)
        assert b.done()

    run(go())
