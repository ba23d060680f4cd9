"""The Batch API's plain parts without a server: an input file's checks (lines.py), a batch's
statuses and limits (state.py), and the store's exactly-once lines (store.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrelay.api.batch.lines import read, validate
from llmrelay.api.batch.state import BatchLimits, BatchRecord, FileRecord
from llmrelay.api.batch.store import BatchStore
from llmrelay.api.errors import APIError


def line(cid: str, **body: object) -> bytes:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "m", "input": "x", **body}}).encode()


def test_validate_names_each_bad_line_and_keeps_good_ones() -> None:
    data = b"\n".join([line("a"), b"", line("a"), line("b", model="n"), line("c", input=[]),
                       b'{"custom_id": "d", "method": "POST", "url": "/v1/embeddings", '
                       b'"body": {"model": "m", "input": "\\ud800"}}'])
    checked = validate(data, "/v1/embeddings")
    assert [(e["line"], e["code"]) for e in checked.errors] == [
        (3, "duplicate_custom_id"), (4, "mismatched_model"), (6, "invalid_value")]
    assert checked.errors[2]["param"] == "body.input"
    assert [x.number for x in checked.lines] == [1, 5]  # line 5 passes here, fails when run
    assert checked.model == "m"
    assert validate(b"\n\n", "/v1/embeddings").errors[0]["code"] == "empty_file"

    def unknown(model: str) -> None:
        raise APIError(404, "no such model", code="model_not_found")
    assert validate(line("a"), "/v1/embeddings", unknown).errors[0]["code"] == "model_not_found"
    assert [x.custom_id for x in read(data.replace(line("a"), line("z"), 1))][:1] == ["z"]


def test_a_batch_moves_through_its_statuses() -> None:
    b = BatchRecord("batch_1", "", "k", "/v1/embeddings", "file-1", "24h", 100, 200)
    b.start(3, "m", 101)
    assert not b.expired(199) and b.expired(200)
    b.cancel(150)
    b.cancel(151)  # again: nothing new
    assert b.status == "cancelling" and b.stamps["cancelling_at"] == 150
    b.finalize("cancelled", 152)
    with pytest.raises(APIError) as e:
        b.cancel(153)
    assert e.value.status == 409
    b.finish("file-2", None, 154)
    obj = b.to_object()
    assert (obj["status"], obj["cancelled_at"], obj["output_file_id"]) == ("cancelled", 154,
                                                                          "file-2")
    assert BatchRecord.from_json(b.to_json()) == b


def test_limits() -> None:
    limits = BatchLimits(max_file_bytes=10, max_key_bytes=15, max_open_batches=2)
    limits.check_upload(10, 5)
    with pytest.raises(APIError) as e:
        limits.check_upload(11, 0)
    assert e.value.status == 413
    with pytest.raises(APIError) as e:
        limits.check_upload(10, 6)
    assert e.value.code == "storage_limit_exceeded"
    limits.check_open(1)
    with pytest.raises(APIError) as e:
        limits.check_open(2)
    assert e.value.status == 429
    with pytest.raises(APIError):
        limits.window("1h")


def test_a_line_is_recorded_once_and_survives_reopening(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "responses.sqlite")
    staged = store.staging()
    staged.write_bytes(b"hello")
    store.add_file(FileRecord("file-1", "alice", "in.jsonl", "batch", 5, 1), staged)
    b = BatchRecord("batch_1", "alice", "alice", "/v1/embeddings", "file-1", "24h", 1, 2)
    b.start(2, "m", 1)
    store.put_batch(b)
    assert store.record_line(b, 1, True, {"custom_id": "a"}, 3, 0)
    assert not store.record_line(b, 1, True, {"custom_id": "a"}, 3, 0)
    assert (b.completed, b.prompt_tokens) == (1, 3)
    store.close()
    again = BatchStore(tmp_path / "responses.sqlite")
    assert again.answered("batch_1") == {1}
    assert again.get_batch("alice", "batch_1") == b
    assert again.get_batch("bob", "batch_1") is None and again.get_file("bob", "file-1") is None
    assert [x.id for x in again.unfinished()] == ["batch_1"]
    assert again.read_file("file-1") == b"hello" and again.stored_bytes("alice") == 5
    again.close()


def test_expires_after_is_checked_as_openai_does() -> None:
    limits = BatchLimits(min_expiry_seconds=3600)
    assert limits.expiry(None, "expires_after") is None
    assert limits.expiry({"anchor": "created_at", "seconds": 3600}, "expires_after") == 3600
    for bad in ({"anchor": "created_at", "seconds": 60}, {"anchor": "now", "seconds": 3600},
                {"anchor": "created_at", "seconds": 31 * 86400}, {"seconds": "3600"},
                {"anchor": "created_at", "seconds": True}, "3600"):
        with pytest.raises(APIError) as e:
            limits.expiry(bad, "output_expires_after")
        assert e.value.status == 400 and e.value.param == "output_expires_after"


def test_the_sweep_deletes_expired_files_rows_and_bytes(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "responses.sqlite")
    for file_id, expires in (("file-old", 100), ("file-new", 200), ("file-kept", None)):
        staged = store.staging()
        staged.write_bytes(b"x")
        store.add_file(FileRecord(file_id, "a", "f", "batch", 1, 1, expires), staged)
    assert store.get_file("a", "file-old").gone(150)  # type: ignore[union-attr]
    assert store.expire(150) == ["file-old"]
    assert store.get_file("a", "file-old") is None and not store.file_path("file-old").exists()
    assert [f.id for f in store.list_files("a")] == ["file-new", "file-kept"]
    assert store.get_file("a", "file-new").expires_at == 200  # type: ignore[union-attr]
    store.close()
