"""Models on demand without servers: sizes and durations, the GGUF header reader, estimates,
declarations (stack tables, catalog, a models folder), the host's policy with a fake clock
(queue, LRU eviction, busy and pinned models, reservations, back-off, idle unloads and the
keep_alive ceiling), the cluster's view of declared models, the API server's coalesced loads
(against a stub host), and the stack file's on-demand workers."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmrelay.api.errors import APIError
from llmrelay.api.ondemand.loads import Loads
from llmrelay.api.ondemand.middleware import peek, sse_error
from llmrelay.api.table import WorkerTable
from llmrelay.launcher import StackError, load_stack
from llmrelay.ondemand.catalog import CatalogError, ModelSpec, scan_models_dir, spec_from_entry
from llmrelay.ondemand.estimate import Budget, Estimate, estimate
from llmrelay.ondemand.gguf import GGUFError, read_info
from llmrelay.ondemand.policy import (
    LOADED,
    RESERVE_S,
    UNLOADED,
    Entry,
    Evict,
    Fail,
    Load,
    Pool,
    Ready,
    Refusal,
    Wait,
)
from llmrelay.ondemand.sizes import GiB, MiB, parse_budget, parse_bytes, parse_duration
from llmrelay.ondemand.view import declared_models
from llmrelay.protocol import OUR_EXTENSIONS
from llmrelay.worker.managed import free_port
from llmrelay.worker.models import resolve

# ---- sizes -------------------------------------------------------------------------------------


def test_sizes_and_durations() -> None:
    assert parse_bytes("12GiB") == 12 * GiB == parse_bytes("12 GB") == parse_bytes("12g")
    assert parse_bytes("800MiB") == 800 * MiB
    assert parse_bytes(1234) == 1234 == parse_bytes("1234")
    assert parse_budget("12GiB") == (12 * GiB, None)
    assert parse_budget("0.8") == (None, 0.8) == parse_budget("80%")
    assert parse_budget("1") == (None, 1.0)
    assert parse_budget("2000000000") == (2000000000, None)
    with pytest.raises(ValueError, match="not a size"):
        parse_budget("lots")
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90 == parse_duration(90) == parse_duration("90")
    assert parse_duration("0") == 0
    assert parse_duration("-1") is None and parse_duration(-1) is None
    assert parse_duration(None) is None and parse_duration("never") is None
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("ten minutes")


# ---- GGUF headers and estimates -----------------------------------------------------------------


def test_gguf_header_of_the_bundled_model() -> None:
    info = read_info(resolve("smollm2").path)
    assert info.architecture == "llama"
    assert info.arch("block_count") == 30 and info.arch("attention.head_count_kv") == 3
    assert 130e6 < info.elements < 140e6  # SmolLM2-135M
    assert info.metadata["tokenizer.ggml.tokens"] == 49152  # a long array: its length only


def test_gguf_reader_refuses_what_is_not_one(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_info(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(resolve("smollm2").path.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="truncated|damaged"):
        read_info(cut)


def test_estimate_gguf_counts_weights_kv_cache_and_process() -> None:
    small = estimate(spec_from_entry({"model_path": "smollm2", "context_length": 512,
                                      "limit_worker_concurrency": 1}, "t"))
    big = estimate(spec_from_entry({"model_path": "smollm2", "context_length": 4096}, "t"))
    kv = dict(big.parts)
    # 30 layers x 3 KV heads x (64 + 64) x 2 bytes per token, 4096 tokens x 5 sequences
    assert kv["KV cache (4096 tokens x 5 sequences)"] == 30 * 3 * 128 * 2 * 4096 * 5
    assert big.total - small.total == 30 * 3 * 128 * 2 * (4096 * 5 - 512)
    assert "weights" in big.describe() and "process" in big.describe()
    # The context that fits a budget: a power of two, never above the configured one.
    assert big.context_that_fits(small.total + 30 * 3 * 128 * 2 * 1024 * 5) == 1024
    assert big.context_that_fits(10 * GiB) == 4096
    assert big.context_that_fits(small.fixed) is None


def test_budget_as_a_share_of_free_memory_is_fixed_at_first_use() -> None:
    free = [1000 * MiB]
    b = Budget("0.5", gpu=False, free=lambda: free[0])
    assert b.capacity() == 500 * MiB
    free[0] = 10 * MiB
    assert b.capacity() == 500 * MiB  # fixed: plans do not move with other programs
    assert "50%" in b.describe()
    assert Budget("1GiB", gpu=False).capacity() == GiB


# ---- declarations -------------------------------------------------------------------------------


def test_spec_from_a_stack_table() -> None:
    s = spec_from_entry({"model_path": "smollm2", "model_names": ["smol"], "load": "on-demand",
                         "idle_unload": "10m", "pin": False, "context_length": 512}, "w")
    assert (s.name, s.load, s.idle_unload, s.kind) == ("smol", "on-demand", 600.0, "gguf")
    assert s.argv()[:2] == ["--model-path", "smollm2"] and "--context-length" in s.argv()
    assert spec_from_entry({"model_path": "gemma3-270m", "load": "manual"}, "w").name == \
        "gemma3-270m"
    with pytest.raises(CatalogError, match="unknown setting 'bogus'"):
        spec_from_entry({"model_path": "smollm2", "bogus": 1}, "w")
    with pytest.raises(CatalogError, match="port is chosen by the host"):
        spec_from_entry({"model_path": "smollm2", "port": 1234}, "w")
    with pytest.raises(CatalogError, match="load must be one of"):
        spec_from_entry({"model_path": "smollm2", "load": "lazy"}, "w")
    with pytest.raises(CatalogError, match="does not exist"):
        spec_from_entry({"model_path": "/nowhere/x.gguf"}, "w")


def test_models_dir_names_files_and_folders(tmp_path: Path) -> None:
    gguf = resolve("smollm2").path
    (tmp_path / "alpha.gguf").symlink_to(gguf)
    (tmp_path / "big-00001-of-00002.gguf").symlink_to(gguf)
    (tmp_path / "big-00002-of-00002.gguf").symlink_to(gguf)
    hf = tmp_path / "beta-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / ".hidden.gguf").symlink_to(gguf)
    specs = scan_models_dir(tmp_path, {"n_threads": 1})
    assert [(s.name, s.kind) for s in specs] == [("alpha", "gguf"), ("beta-hf", "hf"),
                                                  ("big", "gguf")]
    assert all(s.load == "on-demand" and s.flags["n_threads"] == 1 for s in specs)


# ---- the policy ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pool(*models: tuple[str, int], capacity: int = 100, clock: Clock | None = None,
         **spec: Any) -> Pool:
    """Models of the given estimated sizes (bytes) in a fixed budget."""
    entries = {}
    for name, need in models:
        extra = spec.get(name, {})
        s = ModelSpec(name=name, flags={"model_path": "x"}, **extra)
        entries[name] = Entry(s, Estimate(need, [("weights", need)], "llamacpp", fixed=need))
    return Pool(entries, lambda: capacity, lambda: f"{capacity} B", clock or Clock(),
                keep_alive_max=600)


def load(p: Pool, name: str, used_at: float | None = None) -> None:
    """Load `name` as the host would, and let one request reach it."""
    p.want(name)
    step = p.step()
    assert step == Load(name), step
    p.started(name)
    p.loaded(name, f"http://{name}", 1)
    p.release(name)
    p.activity(name, 0, 1, used_at if used_at is not None else p.clock())


def test_many_requests_share_one_load() -> None:
    p = pool(("a", 40))
    assert [p.want("a") for _ in range(8)] == [False] * 8
    assert p.queue == ["a"] and p.get("a").wanted == 8
    assert p.step() == Load("a")
    p.started("a")
    assert p.step() is None  # loading: nothing more to do for it
    assert p.want("a") is False  # one more joins the same load
    p.loaded("a", "http://a", 7)
    assert p.want("a") is True and p.get("a").loads == 1


def test_lru_idle_model_is_evicted_and_nothing_else() -> None:
    clock = Clock()
    p = pool(("a", 40), ("b", 40), ("c", 40), capacity=100, clock=clock)
    load(p, "a", used_at=1000)
    load(p, "b", used_at=1001)
    p.activity("a", 0, 5, 1005)  # a was used last: b is the least recently used
    clock.t = 1100
    assert p.want("c") is False
    assert p.step() == Evict("b")
    p.unloading("b", evicted=True)
    assert isinstance(p.step(), Wait)  # b's memory is still held until its process exits
    p.unloaded("b")
    assert p.step() == Load("c")
    assert p.get("a").state == LOADED and p.get("a").evictions == 0
    assert p.get("b").evictions == 1


def test_busy_model_is_not_evicted_the_load_waits() -> None:
    clock = Clock()
    p = pool(("a", 60), ("b", 60), capacity=100, clock=clock)
    load(p, "a")
    p.activity("a", 1, 1, clock.t)  # a request is running on it
    clock.t += RESERVE_S + 1
    p.want("b")
    step = p.step()
    assert isinstance(step, Wait) and "waiting for a to be idle" in step.reason
    p.activity("a", 0, 1, clock.t)
    assert p.step() == Evict("a")


def test_pinned_model_is_never_evicted() -> None:
    clock = Clock()
    p = pool(("pin", 50), ("a", 40), ("b", 40), capacity=100, clock=clock,
             pin={"pin": True})
    load(p, "pin", used_at=0)  # least recently used of all, but pinned
    load(p, "a", used_at=10)
    clock.t += RESERVE_S + 1
    p.want("b")
    assert p.step() == Evict("a")
    big = pool(("pin", 50), ("huge", 60), capacity=100, pin={"pin": True})
    load(big, "pin")
    with pytest.raises(Refusal, match="beside the pinned pin") as r:
        big.want("huge")
    assert r.value.code == "model_too_large"


def test_an_admins_pin_keeps_a_model_loaded_and_unpin_lets_it_go() -> None:
    clock = Clock()
    p = pool(("a", 40), ("b", 40), ("c", 40), capacity=100, clock=clock,
             a={"idle_unload": 60.0})
    load(p, "a", used_at=clock.t)  # the least recently used...
    load(p, "b", used_at=clock.t + 1)
    p.hint("a", 5)
    p.pin("a")  # ... but pinned at run time: never the one evicted, nor unloaded for idling
    assert p.get("a").spec.pin and p.get("a").keep is None
    assert [d["pin"] for d in p.declared()] == [True, False, False]
    clock.t += 10_000
    assert p.idle() == []
    p.want("c")
    assert p.step() == Evict("b")
    p.unloading("b", evicted=True)
    p.unloaded("b")
    assert p.step() == Load("c")
    p.started("c")
    p.loaded("c", "http://c", 3)
    p.release("c")
    p.hint("a", 5)  # pinned: deaf to keep_alive
    assert p.get("a").keep is None
    p.pin("a", False)  # unpinned: an idle model again, its idle time counted from now
    assert not p.get("a").spec.pin and p.idle() == []
    clock.t += 60
    assert p.idle() == ["a"]
    # pinning an unloaded model, even one an admin unloaded, has the host load it
    p.unloading("a")
    p.unloaded("a")
    p.hold_down("a")
    assert p.pinned_missing() == []
    p.pin("a")
    assert p.pinned_missing() == ["a"]
    # a model that cannot fit beside the pinned ones cannot be pinned
    big = pool(("pin", 60), ("b", 50), capacity=100, pin={"pin": True})
    load(big, "pin")
    with pytest.raises(Refusal, match="Cannot pin.*beside the pinned pin") as r:
        big.pin("b")
    assert r.value.status == 409 and r.value.code == "model_too_large"
    assert not big.get("b").spec.pin


def test_too_big_is_refused_with_both_figures_and_the_flags_that_help() -> None:
    p = pool(("a", 10))
    e = Entry(ModelSpec("huge", {"model_path": "x"}),
              Estimate(3 * GiB, [("weights", GiB), ("KV cache", 2 * GiB)], "llamacpp",
                       tokens=8192, sequences=5, kv_per_token=50 * 1024, fixed=GiB))
    p.entries["huge"] = e
    p.capacity = lambda: 2 * GiB
    with pytest.raises(Refusal) as r:
        p.want("huge")
    msg = r.value.message
    assert r.value.status == 503 and "3.00 GiB" in msg and "2.00 GiB" in msg
    assert "--max-memory" in msg and "context_length = 4096" in msg
    assert "limit_worker_concurrency" in msg
    assert p.queue == []


def test_fifo_and_a_client_that_leaves_gives_its_place_up() -> None:
    clock = Clock()
    p = pool(("a", 60), ("b", 60), ("c", 60), capacity=100, clock=clock)
    load(p, "a")
    p.activity("a", 1, 1, clock.t)
    p.want("b")
    p.want("c")
    assert p.queue == ["b", "c"]
    p.release("b")  # b's only client left: b's entry goes, a keeps its place
    assert p.queue == ["c"]
    p.release("c")
    p.activity("a", 0, 1, clock.t)
    assert p.step() is None and p.get("a").state == LOADED


def test_a_just_loaded_model_is_kept_for_its_first_request() -> None:
    clock = Clock()
    p = pool(("a", 60), ("b", 60), capacity=100, clock=clock)
    p.want("a")
    p.started(p.step().name)  # type: ignore[union-attr]
    p.loaded("a", "http://a", 1)
    p.release("a")
    p.want("b")
    assert isinstance(p.step(), Wait)  # a's request has not reached it yet
    p.activity("a", 1, 1, clock.t)
    assert isinstance(p.step(), Wait)  # now it runs there
    p.activity("a", 0, 1, clock.t)
    assert p.step() == Evict("a")
    # An admin's load is not kept for anyone: it can go at once.
    r = pool(("a", 60), ("b", 60), capacity=100, clock=clock)
    r.want("a", admin=True)
    r.started("a")
    r.loaded("a", "http://a", 1)
    r.release("a", admin=True)
    r.want("b")
    assert r.step() == Evict("a")
    # Nobody came within the reservation: it can go.
    q = pool(("a", 60), ("b", 60), capacity=100, clock=clock)
    q.want("a")
    q.started("a")
    q.loaded("a", "http://a", 1)
    q.release("a")
    q.want("b")
    clock.t += RESERVE_S
    assert q.step() == Evict("a")


def test_failed_load_backs_off_then_tries_again() -> None:
    clock = Clock()
    p = pool(("a", 10), clock=clock)
    p.want("a")
    p.started("a")
    refusal = p.failed("a", "llama.cpp could not load a.gguf")
    assert refusal.status == 503 and "could not load" in refusal.message
    with pytest.raises(Refusal, match="tried again in 1 s") as r:
        p.want("a")
    assert r.value.retry_after == pytest.approx(1.0)
    clock.t += 1
    assert p.want("a") is False  # past the back-off: a new try
    p.started("a")
    p.failed("a", "again")
    with pytest.raises(Refusal, match="in 2 s"):
        p.want("a")
    assert p.want("a", admin=True) is False  # an admin's load is not held back


def test_manual_models_load_only_for_an_admin() -> None:
    p = pool(("m", 10), m={"load": "manual"})
    with pytest.raises(Refusal, match="llmrelay models load m") as r:
        p.want("m")
    assert r.value.status == 400
    assert p.want("m", admin=True) is False
    p.release("m", admin=True)
    assert p.queue == ["m"]  # an admin's load goes on without the admin waiting


def test_idle_unload_and_the_keep_alive_ceiling() -> None:
    clock = Clock()
    p = pool(("a", 10), ("b", 10), ("pin", 10), clock=clock,
             a={"idle_unload": 60.0}, b={"keep_alive_max": 30.0},
             pin={"pin": True, "idle_unload": 1.0})
    for name in ("a", "b", "pin"):
        load(p, name)
    clock.t += 59
    assert p.idle() == []
    clock.t += 1
    assert p.idle() == ["a"]
    p.hint("a", 3600)  # longer than the host's ceiling (600 s): capped
    assert p.idle_timeout(p.get("a")) == 600
    p.hint("a", None)  # "forever": the ceiling
    assert p.idle_timeout(p.get("a")) == 600
    p.hint("b", 3600)  # b's own ceiling: 30 s
    assert p.idle_timeout(p.get("b")) == 30
    p.hint("b", 0)  # unload as soon as idle
    assert "b" in p.idle()
    p.hint("pin", 0)  # a pinned model ignores hints and is never idle-unloaded
    clock.t += 10_000
    assert "pin" not in p.idle()


def test_unloading_model_is_reloaded_after_it_is_gone() -> None:
    p = pool(("a", 10))
    load(p, "a")
    p.unloading("a")
    assert p.want("a") is False
    assert isinstance(p.step(), Wait)
    p.unloaded("a")
    assert p.step() == Load("a")


def test_crash_takes_one_model_down_and_pinned_ones_come_back() -> None:
    clock = Clock()
    p = pool(("a", 10), ("pin", 10), clock=clock, pin={"pin": True})
    load(p, "a")
    load(p, "pin")
    p.unloaded("pin", crash="its worker exited with code -9")
    assert p.get("a").state == LOADED and p.get("pin").state == UNLOADED
    assert p.pinned_missing() == []  # within the back-off
    clock.t += 1
    assert p.pinned_missing() == ["pin"]
    p.hold_down("pin")  # an admin unloaded it: it stays down
    assert p.pinned_missing() == []


def test_ready_and_fail_steps() -> None:
    p = pool(("a", 10), ("b", 500))
    p.want("a")
    p.started("a")
    p.loaded("a", "http://a", 1)
    p.queue.append("a")
    assert p.step() == Ready("a")
    p.queue.append("b")  # queued before the budget shrank, say
    assert isinstance(p.step(), Fail)


# ---- the cluster's view ------------------------------------------------------------------------


def host_status(*declared: dict[str, Any]) -> dict[str, Any]:
    return {"model_names": [], "llmrelay": {"role": "host", "extensions": ["host"],
                                            "declared": list(declared)}}


def test_declared_models_from_hosts_prefer_where_loaded() -> None:
    got = declared_models([
        ("http://h1", host_status({"name": "a", "state": "unloaded", "bytes": 5},
                                  {"name": "b", "state": "loading"}), 1.0),
        ("http://h2", host_status({"name": "a", "state": "loaded", "address": "http://w"}), 2.0),
        ("http://w", {"model_names": ["x"], "llmrelay": {"extensions": OUR_EXTENSIONS}}, 3.0),
    ])
    assert got["a"].host == "http://h2" and got["a"].state == "loaded"
    assert got["a"].address == "http://w"
    assert got["b"].state == "loading" and set(got) == {"a", "b"}


# ---- the API server's loads ---------------------------------------------------------------------


def table_with(host_state: str, worker: bool) -> dict[str, Any]:
    workers = [{"name": "http://host", "model_names": [], "registered_at": 1.0,
                "last_heart_beat": 1.0,
                "status": host_status({"name": "m", "state": host_state, "address": "http://w"})}]
    if worker:
        workers.append({"name": "http://w", "model_names": ["m"], "registered_at": 2.0,
                        "last_heart_beat": 2.0,
                        "status": {"model_names": ["m"],
                                   "llmrelay": {"extensions": OUR_EXTENSIONS}}})
    return {"workers": workers}


def test_loads_coalesce_bound_the_waiters_and_pass_refusals_on() -> None:
    async def main() -> None:
        table = WorkerTable(["http://c"])
        table.apply(table_with("unloaded", worker=False))
        calls: list[dict[str, Any]] = []
        answer: dict[str, Any] = {"status": 200}
        gate = asyncio.Event()

        async def host(request: httpx.Request) -> httpx.Response:
            calls.append({"path": request.url.path, "body": request.content})
            if request.url.path == "/host/ensure":
                await gate.wait()
                if answer["status"] != 200:
                    return httpx.Response(answer["status"], headers={"Retry-After": "3"}, json={
                        "error": {"message": "Model 'm' failed to load: bad file",
                                  "code": "model_load_failed"}})
                return httpx.Response(200, json={"model": "m", "state": "loaded",
                                                 "address": "http://w"})
            return httpx.Response(200, json={})

        async def refresh() -> None:
            table.apply(table_with("loaded", worker=gate.is_set()))

        client = httpx.AsyncClient(transport=httpx.MockTransport(host))
        loads = Loads(table, client, refresh, max_waiting=8)
        assert not loads.quick("m")
        waiters = [asyncio.create_task(loads.ready("m")) for _ in range(8)]
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as full:  # a ninth waiter: the queue is full
            await loads.ready("m")
        assert full.value.status == 429 and full.value.headers["Retry-After"]
        gate.set()
        await asyncio.gather(*waiters)
        assert [c["path"] for c in calls].count("/host/ensure") == 1
        assert loads.quick("m") and not loads.pending

        # A refused load: every waiter gets the host's status and message.
        table.apply(table_with("unloaded", worker=False))
        answer["status"] = 503
        results = await asyncio.gather(*(loads.ready("m") for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, APIError) and r.status == 503 and "bad file" in r.message
                   and r.headers.get("Retry-After") == "3" for r in results)
        assert [c["path"] for c in calls].count("/host/ensure") == 2

        # Every waiter leaves: the host call is let go.
        gate.clear()
        w = asyncio.create_task(loads.ready("m"))
        await asyncio.sleep(0.05)
        pending = loads.pending["m"]
        w.cancel()
        await asyncio.sleep(0.05)
        assert pending.task.cancelled() and "m" not in loads.pending
        await client.aclose()

    asyncio.run(main())


def test_peek_and_sse_error() -> None:
    assert peek(b'{"model": "m", "stream": true, "keep_alive": "5m"}') == ("m", "5m", True)
    assert peek(b"[1]") is None and peek(b"not json") is None
    assert sse_error(b'{"error": {"message": "x"}}').endswith(b"data: [DONE]\n\n")


# ---- the stack file -----------------------------------------------------------------------------


def test_stack_on_demand_workers_go_to_one_host(tmp_path: Path) -> None:
    c, a = free_port(), free_port()
    path = tmp_path / "stack.toml"
    path.write_text(f"""
[controller]
port = {c}
[api]
port = {a}
[host]
port = {free_port()}
max_memory = "2GiB"
admin_key = "secret-admin"
[[worker]]
model_path = "smollm2"
model_names = ["smol"]
port = {free_port()}
[[worker]]
model_path = "gemma3-270m"
model_names = ["gemma"]
load = "on-demand"
idle_unload = "10m"
[[worker]]
model_path = "smollm2"
model_names = ["pinned-smol"]
pin = true
""")
    stack, _ = load_stack(str(path), str(tmp_path / "logs"))
    names = [w.name for w in stack.workers]
    assert names == ["worker-smol", "host"]
    host = stack.workers[1]
    assert "--max-memory" in host.argv and "2GiB" in host.argv
    assert "secret-admin" not in " ".join(host.argv)  # the key travels in the environment
    assert host.env["LLMRELAY_ADMIN_KEY"] == "secret-admin" == stack.admin_key
    # the API server gets it too (its --host-admin-key): the console's load/unload/pin buttons
    assert stack.api.env["LLMRELAY_ADMIN_KEY"] == "secret-admin"
    assert "secret-admin" not in " ".join(stack.api.argv)
    assert stack.on_demand == ["gemma", "pinned-smol"]

    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace('idle_unload = "10m"', 'idle_unload = "soon"'))
    with pytest.raises(StackError, match="not a duration"):
        load_stack(str(bad), str(tmp_path / "logs"))
    bad.write_text(path.read_text().replace('max_memory = "2GiB"', 'max_mem = "2GiB"'))
    with pytest.raises(StackError, match=r"\[host\]: unknown setting 'max_mem'"):
        load_stack(str(bad), str(tmp_path / "logs"))


def test_up_models_dir_alone(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(resolve("smollm2").path, models / "tiny.gguf")
    path = tmp_path / "stack.toml"  # no [[worker]]: the folder's models only
    path.write_text(f"[controller]\nport = {free_port()}\n[api]\nport = {free_port()}\n"
                    f"[host]\nport = {free_port()}\n")
    stack, _ = load_stack(str(path), str(tmp_path / "logs"), str(models))
    assert [w.name for w in stack.workers] == ["host"] and stack.on_demand == ["tiny"]
    assert stack.admin_key == stack.api.env["LLMRELAY_ADMIN_KEY"]  # generated, for both
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StackError, match="no .gguf file or HF folder"):
        load_stack(str(path), str(tmp_path / "logs"), str(empty))


def test_unknown_model_is_a_404_naming_declared_models_too() -> None:
    table = WorkerTable(["http://c"])
    table.apply({"workers": []})
    table.declared_names = lambda: ["gemma", "smol"]
    with pytest.raises(APIError) as e:  # not "no workers available": the models exist
        table.check_model("gema")
    assert e.value.status == 404 and "gemma, smol" in e.value.message
    assert "Did you mean 'gemma'" in e.value.message
