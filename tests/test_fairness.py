"""The worker's fair queue (worker/fairness.py), driven without a server and with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from llmrelay.protocol import ErrorCode
from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.fairness import FairQueue, Full


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


# ---- a full queue (the worker's --max-queue) ------------------------------------------------

def test_a_full_queue_still_takes_a_key_with_nothing_running_into_the_reserve() -> None:
    from llmrelay.worker.service import WorkerState

    state = WorkerState(limit=1, max_queue=2, reserve=1)

    async def go() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(state.slot("A"))
            a = [asyncio.create_task(stack.enter_async_context(state.slot("A")))
                 for _ in range(2)]
            await asyncio.sleep(0)
            assert (state.running, state.waiting) == (1, 2)
            with pytest.raises(EngineError) as e:  # A's own flood is refused past the bound
                state.admit("A")
            assert e.value.code == ErrorCode.ENGINE_OVERLOADED
            await asyncio.wait_for(stack.enter_async_context(state.slot("B")), 1)
            assert state.running == 2 and state.queue.running_by_key == {"A": 1, "B": 1}
            for t in a:
                t.cancel()

    run(go())


def test_a_full_queue_pushes_out_the_heaviest_keys_newest_waiter() -> None:
    q = FairQueue(limit=1, reserve=1)

    async def go() -> None:
        await q.acquire("A")
        a = [asyncio.create_task(q.acquire("A")) for _ in range(4)]
        await asyncio.sleep(0)
        await q.acquire("B")  # nothing of B's runs: the reserve, no waiting place
        assert q.make_room("B")  # A holds 5, B 1: A's newest waiter goes
        b2 = asyncio.create_task(q.acquire("B"))
        await asyncio.sleep(0)
        assert q.make_room("B")  # A 4, B 2
        b3 = asyncio.create_task(q.acquire("B"))
        await asyncio.sleep(0)
        assert not q.make_room("B")  # A 3, B 3: even, B's next is refused
        assert len(q.waiting) == 4 and [w.key for w in q.waiting] == ["A", "A", "B", "B"]
        for t in a[2:]:
            with pytest.raises(Full):
                await t
        assert not any(t.done() for t in a[:2])
        q.release("B")  # B's waiters have the least service: they run first
        await asyncio.sleep(0)
        assert b2.done() and not b3.done()
        for t in (*a[:2], b3):
            t.cancel()

    run(go())


def test_pushing_out_spares_a_key_alone_and_interactive_work() -> None:
    q = FairQueue(limit=1, reserve=1)

    async def go() -> None:
        await q.acquire("A")
        a = asyncio.create_task(q.acquire("A"))
        await asyncio.sleep(0)
        assert not q.make_room("A")  # one key alone (or no keys) never displaces itself
        await q.acquire("C")  # the reserve
        assert not q.make_room("C")  # A holds 2, C 1: a swap would only turn it round
        assert not q.make_room("B", "batch")  # batch never pushes out interactive work
        assert not a.done()
        assert q.make_room("B")  # A holds 2, B nothing: A's waiter goes
        with pytest.raises(Full):
            await a

    run(go())
