"""A model whose workers restart is not unknown: the API server's worker table answers 503 with
Retry-After (never 404) for a model served less than the grace period ago, and always for the
names the stack declares; `llmrelay up` passes those names to its API server. Driven without a
server, with a fake clock."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from llmrelay.api.errors import APIError
from llmrelay.api.table import DEFAULT_GRACE, WorkerTable
from llmrelay.launcher import load_stack


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def table(*workers: tuple[str, list[str]]) -> dict[str, Any]:
    return {"workers": [{"name": name, "model_names": models, "speed": 1, "queue_length": 0,
                         "last_heart_beat": 1.0, "registered_at": 1.0, "status": {}}
                        for name, models in workers]}


def refusal(t: WorkerTable, model: str, **kw: Any) -> APIError:
    with pytest.raises(APIError) as e:
        t.check_model(model, **kw)
    return e.value


def test_a_model_whose_workers_left_is_a_503_for_the_grace_period_then_a_404() -> None:
    clock = Clock()
    t = WorkerTable(["http://c"], clock=clock, grace=60)
    t.apply(table(("w1", ["smol"]), ("w2", ["smol-od"])))
    t.check_model("smol")
    t.apply(table(("w2", ["smol-od"])))  # smol's only worker restarts
    e = refusal(t, "smol")
    assert e.status == 503 and e.headers["Retry-After"] and e.code == "model_unavailable"
    assert e.type == "server_error" and "restarting" in e.message and "smol-od" not in e.message
    assert "smol" not in t.models()  # /v1/models lists what is served now
    clock.t += 59
    t.apply(table(("w2", ["smol-od"])))
    assert refusal(t, "smol").status == 503
    t.apply(table(("w1b", ["smol"]), ("w2", ["smol-od"])))  # back: served again
    t.check_model("smol")
    t.apply(table(("w2", ["smol-od"])))  # gone again: a fresh grace period
    clock.t += 60
    assert refusal(t, "smol").status == 503
    clock.t += 1
    t.apply(table(("w2", ["smol-od"])))
    e = refusal(t, "smol")
    assert e.status == 404 and e.code == "model_not_found" and "smol-od" in e.message


def test_a_name_never_served_is_still_a_404_and_a_key_sees_no_difference() -> None:
    clock = Clock()
    t = WorkerTable(["http://c"], clock=clock)
    assert t.grace == DEFAULT_GRACE == 60
    t.apply(table(("w1", ["smol"]), ("w2", ["gemma"])))
    t.apply(table(("w2", ["gemma"])))
    assert refusal(t, "smoll").status == 404  # never served: unknown, whatever is close to it
    # A key that may not use the model learns nothing: the same 404 as for any unknown name.
    e = refusal(t, "smol", allowed=lambda m: m == "gemma")
    assert e.status == 404 and e.code == "model_not_found" and "smol" not in e.message.split(
        "serves:")[1]


def test_names_the_stack_declares_are_a_503_whenever_not_served() -> None:
    clock = Clock()
    t = WorkerTable(["http://c"], clock=clock, expected=["smol"])
    t.apply(table(("w2", ["gemma"])))  # smol's worker has not registered yet
    assert refusal(t, "smol").status == 503
    clock.t += 3600
    t.apply(table(("w2", ["gemma"])))
    assert refusal(t, "smol").status == 503
    assert refusal(t, "other").status == 404


def test_up_passes_the_declared_model_names_to_its_api_server(tmp_path: Path) -> None:
    ports = []
    for _ in range(4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    c, a, w1, w2 = ports
    path = tmp_path / "stack.toml"
    path.write_text(f"[controller]\nport = {c}\n\n[api]\nport = {a}\n\n"
                    f"[[worker]]\nmodel_path = 'smollm2'\nmodel_names = 'smol,smol2'\nport = {w1}\n\n"
                    f"[[worker]]\nmodel_path = 'smollm2'\nmodel_names = ['smol']\nport = {w2}\n")
    stack, _ = load_stack(str(path), str(tmp_path / "logs"))
    argv = stack.api.argv
    assert argv[argv.index("--expect-models") + 1] == "smol,smol2"
