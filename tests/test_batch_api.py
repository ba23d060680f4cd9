"""OpenAI's Files and Batch APIs through real processes and the openai SDK: a module stack
(controller, a SmolLM2 worker, a second one running one request at a time, an all-MiniLM-L6-v2
embeddings worker on transformers, and API servers: one open, one with keys and small per-key
limits, one whose "24h" lasts seconds and whose files may expire after 2 s), plus an API server
of the kill test's own."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import Proc, Procs, api_models, registered, wait_for
from llmrelay.api.keys import add_key
from llmrelay.worker.managed import free_port

ENDED = ("completed", "failed", "expired", "cancelled")


@dataclass
class Batches:
    controller: str
    api: str  # no keys
    keyed: str  # keys alice, bob (admin: ops); at most 1 open batch and 64 KiB of files a key
    short: str  # a completion window of "24h" lasts 10 s; files may expire after 2 s
    short_files: Path  # its files' bytes
    keys: dict[str, str]
    smol: str  # the worker's URL
    narrow: Proc  # a worker of SmolLM2 as "narrow", one request at a time
    narrow_url: str
    procs: Procs


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batches]:
    tmp = tmp_path_factory.mktemp("batch")
    procs = Procs(tmp)
    keys_file = tmp / "keys.toml"
    keys = {name: add_key(keys_file, name, admin=name == "ops") for name in ("alice", "bob", "ops")}
    try:
        _, controller = procs.controller()
        _, smol = procs.worker(controller, "smol", wait=False)
        _, emb = procs.worker(controller, "minilm", "all-minilm-l6-v2", wait=False)
        narrow, one = procs.worker(controller, "narrow", wait=False, extra=(
            "--limit-worker-concurrency", "1", "--fair-reserve", "0"))
        for url in (smol, emb, one):
            wait_for(lambda url=url: registered(controller, url), 180, f"worker {url}")
        _, api = procs.api(controller, extra=("--data-dir", str(tmp / "open")))
        _, keyed = procs.api(controller, extra=(
            "--data-dir", str(tmp / "keyed"), "--api-keys-file", str(keys_file),
            "--max-open-batches", "1", "--files-max-mb-per-key", "0.0625"))
        _, short = procs.api(controller, extra=("--data-dir", str(tmp / "short"),
                                                "--batch-window", "10", "--files-min-expiry", "2"))
        wait_for(lambda: api_models(api) == {"smol", "minilm", "narrow"}, 30, "models in the API")
        yield Batches(controller, api, keyed, short, tmp / "short" / "files", keys, smol, narrow,
                      one, procs)
    finally:
        procs.stop_all()


def sdk(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat_line(i: int, model: str = "smol", max_tokens: int = 3, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Count to {i}."}],
                     "max_tokens": max_tokens, "temperature": 0, **body}}


def upload(client: openai.OpenAI, lines: list[Any]) -> str:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    return client.files.create(file=("requests.jsonl", io.BytesIO(text.encode())),
                               purpose="batch").id


def submit(client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions"
           ) -> Any:
    return client.batches.create(input_file_id=upload(client, lines), endpoint=endpoint,  # type: ignore[arg-type]
                                 completion_window="24h")


def until_ended(client: openai.OpenAI, batch_id: str, timeout: float = 240) -> Any:
    got: dict[str, Any] = {}

    def ended() -> bool:
        got["b"] = client.batches.retrieve(batch_id)
        return got["b"].status in ENDED
    wait_for(ended, timeout, f"batch {batch_id} to end")
    return got["b"]


def results(client: openai.OpenAI, batch: Any) -> list[dict[str, Any]]:
    """The output file's lines, then the error file's."""
    out = []
    for fid in (batch.output_file_id, batch.error_file_id):
        if fid:
            out += [json.loads(x) for x in client.files.content(fid).text.splitlines()]
    return out


def test_a_200_line_chat_batch_completes(batches: Batches) -> None:
    c = sdk(batches.api)
    lines = [chat_line(i) for i in range(199)]
    # valid as a request, refused when it runs: its prompt is longer than the context
    lines.insert(57, chat_line(999, messages=[{"role": "user", "content": "word " * 3000}]))
    b = submit(c, lines)
    assert b.status == "in_progress" and b.request_counts.total == 200 and b.model == "smol"
    b = until_ended(c, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.completed, b.request_counts.failed) == (199, 1)
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.output_file_id
    out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines if x["custom_id"]
                                             != "req-999"]  # input order
    for r in out:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and r["error"] is None
        assert r["id"].startswith("batch_req_")
        assert body["object"] == "chat.completion" and body["model"] == "smol"
        assert body["choices"][0]["message"]["content"]
        assert 1 <= body["usage"]["completion_tokens"] <= 3
    err = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert [r["custom_id"] for r in err] == ["req-999"]
    assert err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert b.usage is not None and b.usage.output_tokens == sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in out)
    files = c.files.list()
    assert {f.purpose for f in files} >= {"batch", "batch_output"}
    assert c.batches.list(limit=1).data[0].id == b.id
    usage = httpx.get(batches.api + "/v1/usage").json()["data"]
    assert any(r["model"] == "smol (batch)" and r["requests"] >= 199 for r in usage)


def test_a_100_line_embeddings_batch_completes(batches: Batches) -> None:
    c = sdk(batches.api)
    texts = [f"sentence number {i} about batches" for i in range(100)]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "minilm", "input": t}} for i, t in enumerate(texts)]
    b = until_ended(c, submit(c, lines, "/v1/embeddings").id)
    assert b.status == "completed" and b.error_file_id is None
    assert (b.request_counts.total, b.request_counts.completed) == (100, 100)
    out = results(c, b)
    assert [r["custom_id"] for r in out] == [f"e{i}" for i in range(100)]
    direct = c.embeddings.create(model="minilm", input=[texts[0], texts[99]])
    for r, want in zip((out[0], out[99]), direct.data, strict=True):
        got = r["response"]["body"]["data"][0]["embedding"]
        assert len(got) == 384
        assert max(abs(x - y) for x, y in zip(got, want.embedding, strict=True)) < 1e-4


def test_bad_input_fails_the_batch_naming_each_line(batches: Batches) -> None:
    c = sdk(batches.api)
    lines: list[Any] = [
        chat_line(0),
        "{not json",
        chat_line(0),  # the same custom_id again
        {**chat_line(3), "url": "/v1/completions"},
        chat_line(4, model="other"),
        {**chat_line(5), "body": {"model": "smol"}},  # no messages
        chat_line(6, max_tokens=-1),
        chat_line(7, stream=True),
        {**chat_line(8), "method": "GET"},
    ]
    b = submit(c, lines)
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    got = {(e.line, e.code, e.param) for e in b.errors.data}
    assert got == {(2, "invalid_json_line", None), (3, "duplicate_custom_id", "custom_id"),
                   (4, "mismatched_endpoint", "url"), (5, "mismatched_model", "body.model"),
                   (6, "invalid_request", "body.messages"), (7, "invalid_value", "body.max_tokens"),
                   (8, "invalid_value", "body.stream"), (9, "invalid_value", "method")}, got
    assert c.batches.retrieve(b.id).status == "failed"

    unknown = submit(c, [chat_line(0, model="no-such-model")])
    assert unknown.status == "failed"
    assert [(e.line, e.code, e.param) for e in unknown.errors.data] == [
        (1, "model_not_found", "body.model")]

    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=upload(c, [chat_line(0)]), endpoint="/v1/moderations",
                         completion_window="24h")
    assert e.value.body["param"] == "endpoint"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=upload(c, [chat_line(0)]),
                         endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    assert e.value.body["param"] == "completion_window"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                         completion_window="24h")


def test_cancel_keeps_what_was_answered(batches: Batches) -> None:
    c = sdk(batches.api)
    lines = [chat_line(i, max_tokens=48) for i in range(60)]
    b = submit(c, lines)
    wait_for(lambda: c.batches.retrieve(b.id).request_counts.completed >= 2, 120,
             "a few lines answered")
    cancelling = c.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    b = until_ended(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at
    assert 2 <= b.request_counts.completed < 60
    out = results(c, b)
    assert Counter(r["custom_id"] for r in out) == Counter(x["custom_id"] for x in lines)
    skipped = [r for r in out if r["error"]]
    assert skipped and {r["error"]["code"] for r in skipped} == {"batch_cancelled"}
    assert len(skipped) == 60 - b.request_counts.completed - b.request_counts.failed
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(until_ended(c, submit(c, [chat_line(0)]).id).id)  # completed


def test_a_batch_past_its_window_expires_with_its_answers(batches: Batches) -> None:
    c = sdk(batches.short)
    # a few short lines answered within the window, the long ones cannot all be
    lines = [chat_line(i, max_tokens=1 if i < 4 else 200) for i in range(80)]
    b = submit(c, lines)
    assert b.expires_at - b.created_at == 10
    b = until_ended(c, b.id)
    assert b.status == "expired" and b.expired_at
    out = results(c, b)
    assert Counter(r["custom_id"] for r in out) == Counter(x["custom_id"] for x in lines)
    expired = [r for r in out if r["error"]]
    assert expired and {r["error"]["code"] for r in expired} == {"batch_expired"}
    assert b.request_counts.completed == sum(1 for r in out if r["response"]) > 0


def served(worker: str) -> int:
    return int(httpx.post(worker + "/worker_get_status").json()["llmrelay"]["served"])


def test_an_api_server_killed_mid_batch_finishes_it_after_a_restart(
        batches: Batches, procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    extra = ("--data-dir", str(tmp_path / "data"))
    api, url = procs.api(batches.controller, port, extra)
    wait_for(lambda: "smol" in api_models(url), 30, "smol in the API")
    c = sdk(url)
    lines = [chat_line(i, max_tokens=8) for i in range(40)]
    before = served(batches.smol)
    b = submit(c, lines)
    wait_for(lambda: c.batches.retrieve(b.id).request_counts.completed >= 10, 120,
             "10 lines answered")
    api.kill()  # SIGKILL: nothing is flushed on the way out
    _, url = procs.api(batches.controller, port, extra)
    c = sdk(url)
    answered_before = c.batches.retrieve(b.id).request_counts.completed
    assert answered_before >= 10
    b = until_ended(c, b.id)
    assert b.status == "completed"
    assert (b.request_counts.completed, b.request_counts.failed) == (40, 0)
    out = results(c, b)
    assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines]  # each once
    # what was answered before the kill was not asked again: at most the lines in flight then
    # (the worker's limit, 5, plus one) ran twice
    assert served(batches.smol) - before <= 40 + 6


def test_each_key_sees_only_its_own_files_and_batches(batches: Batches) -> None:
    alice, bob = sdk(batches.keyed, batches.keys["alice"]), sdk(batches.keyed, batches.keys["bob"])
    b = submit(alice, [chat_line(i) for i in range(3)])
    fid = b.input_file_id
    for call in (lambda: bob.files.retrieve(fid), lambda: bob.files.content(fid),
                 lambda: bob.files.delete(fid), lambda: bob.batches.retrieve(b.id),
                 lambda: bob.batches.cancel(b.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):  # bob cannot run alice's file either
        bob.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                           completion_window="24h")
    assert fid not in {f.id for f in bob.files.list()}
    assert b.id not in {x.id for x in bob.batches.list()}
    with pytest.raises(openai.RateLimitError):  # --max-open-batches 1
        submit(alice, [chat_line(0)])
    done = until_ended(alice, b.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    assert alice.files.retrieve(done.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.AuthenticationError):
        sdk(batches.keyed, "sk-wrong").files.list()
    usage = httpx.get(batches.keyed + "/v1/usage", headers={
        "Authorization": f"Bearer {batches.keys['ops']}"}).json()["data"]
    assert {(r["key"], r["model"], r["requests"]) for r in usage} == {("alice", "smol (batch)", 3)}
    # --files-max-mb-per-key 0.0625 (64 KiB): one more file of 60 KiB passes it
    with pytest.raises(openai.BadRequestError) as e:
        bob.files.create(file=("big.jsonl", io.BytesIO(b" " * 61440)), purpose="batch")
        bob.files.create(file=("big.jsonl", io.BytesIO(b" " * 61440)), purpose="batch")
    assert e.value.code == "storage_limit_exceeded"
    alice.files.delete(fid)
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(fid)


def test_llmrelay_batch_run_writes_the_results_in_input_order(batches: Batches,
                                                              tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    bodies = [{"messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 2}
              for i in range(6)]
    requests.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    out = tmp_path / "results.jsonl"
    done = subprocess.run([sys.executable, "-m", "llmrelay.cli", "batch", "run", str(requests),
                           "-o", str(out), "--model", "smol", "--base-url",
                           batches.api + "/v1", "--poll", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"line-{i}" for i in range(1, 7)]
    assert all(r["response"]["status_code"] == 200 for r in rows)
    assert "6/6" in done.stderr  # the progress bar's last state


def test_files_expire_as_asked_and_are_deleted(batches: Batches) -> None:
    c = sdk(batches.short)  # --files-min-expiry 2
    data = json.dumps(chat_line(0)).encode()
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("r.jsonl", io.BytesIO(data)), purpose="batch",
                       expires_after={"anchor": "created_at", "seconds": 1})
    assert e.value.body["param"] == "expires_after"  # type: ignore[index]
    kept = c.files.create(file=("kept.jsonl", io.BytesIO(data)), purpose="batch")
    assert kept.expires_at is None
    brief = c.files.create(file=("brief.jsonl", io.BytesIO(data)), purpose="batch",
                           expires_after={"anchor": "created_at", "seconds": 3})
    assert brief.expires_at == brief.created_at + 3
    b = c.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions",
                         completion_window="24h",
                         output_expires_after={"anchor": "created_at", "seconds": 8})
    b = until_ended(c, b.id)
    assert b.status == "completed"
    out = c.files.retrieve(b.output_file_id)
    assert out.expires_at == out.created_at + 8
    for f in (brief.id, out.id):
        wait_for(lambda f=f: not (batches.short_files / f).exists(), 60, f"{f} deleted on disk")
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve(f)
        with pytest.raises(openai.NotFoundError):
            c.files.content(f)
    assert {kept.id, b.input_file_id} <= {f.id for f in c.files.list()}
    assert not {brief.id, out.id} & {f.id for f in c.files.list()}
    assert c.files.content(kept.id).content == data


def test_batch_lines_wait_behind_interactive_requests_on_a_busy_worker(
        batches: Batches) -> None:
    """A worker running one request at a time (no reserve place), kept busy by a batch: one
    line running, one waiting. Each interactive request of the same key, sent while a batch line
    waits, runs before that line (same key: fair sharing cannot tell them apart, only the
    priority class can): in the worker's log (its requests end in the order they ran) at most
    one batch line ends between the moment the request is seen waiting and its own end."""
    c = sdk(batches.keyed, batches.keys["ops"])
    worker = batches.narrow_url
    # more lines than the test needs (it cancels the batch at the end)
    b = submit(c, [chat_line(i, model="narrow", max_tokens=32) for i in range(80)])

    def waiting() -> int:
        s = httpx.post(worker + "/worker_get_status", timeout=5).json()
        return int(s["queue_length"]) - int(s["llmrelay"]["running"])

    seen = 0
    for i in range(6):
        if seen == 3:
            break
        # (the batch narrows to one line for 2 s after an interactive request: wait for it)
        wait_for(lambda: waiting() >= 1, 120, "a batch line waiting at the worker")
        rid = f"interactive-{i}"
        done = threading.Event()

        def ask(rid: str = rid, done: threading.Event = done) -> None:
            c.with_options(default_headers={"X-Request-ID": rid}).chat.completions.create(
                model="narrow", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            done.set()

        t = threading.Thread(target=ask)
        t.start()
        before = None
        while not done.is_set():  # both waiting: the batch line and this request
            if waiting() >= 2:
                before = batch_ends(batches.narrow.log(), b.id)
                break
            time.sleep(0.02)
        t.join()
        if before is None:
            continue  # it started before it could be seen waiting: no evidence either way
        # (the worker logs a request just after its answer is sent)
        wait_for(lambda rid=rid: f"request {rid}:" in batches.narrow.log(), 30, "its log line")
        log = batches.narrow.log()
        mine = log.index(f"request {rid}:")
        assert batch_ends(log[:mine], b.id) <= before + 1, (rid, before, log[-3000:])
        seen += 1
    assert seen >= 2
    c.batches.cancel(b.id)
    assert until_ended(c, b.id).status == "cancelled"


def batch_ends(log: str, batch_id: str) -> int:
    """How many of the batch's lines the worker's log says ended."""
    return len(re.findall(rf"request {batch_id}-\d+:", log))
