"""Keys file, limits and usage store, driven without a server (fake clock, a real SQLite file)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from llmrelay.api.keys import Key, KeysFileError, KeyStore, add_key, digest
from llmrelay.api.limits import Limiter
from llmrelay.api.usage import UsageStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_keys_file_holds_only_hashes_and_is_reread_on_change(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    alice = add_key(path, "alice", models=["smol*"], requests_per_minute=2, admin=True)
    assert alice.startswith("sk-") and alice not in path.read_text()
    assert digest(alice) in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    clock = Clock()
    store = KeyStore(path=path, clock=clock)
    key = store.lookup(alice)
    assert key is not None and key.name == "alice" and key.admin and key.requests_per_minute == 2
    assert key.may_use("smol") and key.may_use("smol-large") and not key.may_use("gemma")
    assert store.lookup("sk-wrong") is None
    bob = add_key(path, "bob", priority="batch")
    assert store.lookup(bob) is None  # not re-read yet: checked at most once a second
    clock.t += 2
    got = store.lookup(bob)
    assert got is not None and got.priority == "batch" and got.may_use("anything")
    with pytest.raises(KeysFileError, match="already has a key named bob"):
        add_key(path, "bob")
    # A broken file keeps the keys read before.
    path.write_text(path.read_text() + "\n[keys.carol]\nhash = 'nope'\n")
    clock.t += 2
    assert store.lookup(alice) is not None


@pytest.mark.parametrize("text, message", [
    ("[keys.a]\nhash = 'sha256:12'\n", "64 hex digits"),
    (f"[keys.a]\nhash = '{digest('x')}'\nrequests_per_minute = 0\n", "at least 1"),
    (f"[keys.a]\nhash = '{digest('x')}'\npriority = 'urgent'\n", "priority"),
    (f"[keys.a]\nhash = '{digest('x')}'\nrpm = 5\n", "unknown setting"),
    ("[keys\n", "not valid TOML"),
])
def test_bad_keys_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeysFileError, match=message):
        KeyStore(path=path)


def test_plain_keys_still_work(tmp_path: Path) -> None:
    store = KeyStore(plain=["sk-1", "sk-2"])
    k = store.lookup("sk-2")
    assert k is not None and k.name == "key-2" and not k.limited and k.may_use("x")
    lines = tmp_path / "keys.txt"
    lines.write_text("# FastChat-style\nsk-a\nsk-b\n")
    assert KeyStore(path=lines).lookup("sk-b") is not None


def test_request_limit_trips_at_its_number_and_says_when_to_retry() -> None:
    clock = Clock()
    lim = Limiter(clock)
    k = Key("a", requests_per_minute=3)
    for _ in range(3):
        assert lim.admit(k) is None
        lim.done(k, 10)
        clock.t += 10
    r = lim.admit(k)
    assert r is not None and r.limit == "requests"
    assert r.retry_after == pytest.approx(30)  # the first request leaves the window at t+60
    clock.t += r.retry_after
    assert lim.admit(k) is None


def test_token_limits_and_concurrency() -> None:
    clock = Clock()
    lim = Limiter(clock)
    k = Key("a", tokens_per_minute=100, concurrent=2)
    assert lim.admit(k) is None and lim.admit(k) is None
    r = lim.admit(k)
    assert r is not None and r.limit == "concurrent"
    lim.done(k, 60)
    clock.t += 20
    lim.done(k, 60)  # 120 tokens in the last minute: over 100
    r = lim.admit(k)
    assert r is not None and r.limit == "tokens" and r.retry_after == pytest.approx(40)
    clock.t += 40
    assert lim.admit(k) is None  # the first 60 left the window
    day = Key("d", tokens_per_day=50)
    assert lim.admit(day) is None
    lim.done(day, 80)
    r = lim.admit(day)
    assert r is not None and r.limit == "tokens" and r.retry_after == pytest.approx(86400)


def test_usage_counts_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "data" / "usage.sqlite"
    store = UsageStore(db)
    store.record_now("alice", "smol", 10, 5)
    store.record_now("alice", "smol", 3, 2)
    store.record_now("bob", "gemma", 1, 1)
    store.close()
    again = UsageStore(db)
    rows = again.report()
    assert {(r["key"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"])
            for r in rows} == {("alice", "smol", 2, 13, 7), ("bob", "gemma", 1, 1, 1)}
    assert [r["key"] for r in again.report(key="bob")] == ["bob"]
    again.close()


def test_recorded_usage_is_committed_before_record_returns_and_shares_transactions(
        tmp_path: Path) -> None:
    """`record` returns once its counts are committed (another connection sees them); counts
    recorded while the writer is busy (here: another connection holds the write lock) go in
    together, in one transaction; a lone request waits for no fixed delay, only its commit."""
    db = tmp_path / "usage.sqlite"
    store = UsageStore(db)

    def committed() -> dict[str, tuple[int, int, int]]:  # what a crash would leave
        with sqlite3.connect(db) as other:
            return {k: (n, p, c) for k, n, p, c in other.execute(
                "SELECT key, requests, prompt_tokens, completion_tokens FROM usage")}

    async def main() -> None:
        await store.record("alice", "smol", 2, 3)
        assert committed() == {"alice": (1, 2, 3)} and store.commits == 1
        blocker = sqlite3.connect(db)
        blocker.execute("BEGIN IMMEDIATE")  # the writer waits for this lock (busy timeout)
        tasks = [asyncio.create_task(store.record("bob", "smol", 1, 1)) for _ in range(100)]
        await asyncio.sleep(0)  # every task has handed its counts over
        assert not any(t.done() for t in tasks)
        blocker.rollback()
        blocker.close()
        await asyncio.gather(*tasks)
        assert committed() == {"alice": (1, 2, 3), "bob": (100, 100, 100)}
        assert store.commits <= 3  # 1 + at most 2 for the 100: the first may go alone

    asyncio.run(main())
    store.close()
