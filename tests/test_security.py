"""Security rules: the cluster token, registration address checks, API keys from env and file,
keys never logged, echoed input escaped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from conftest import Procs, api_models, free_port, registered, wait_for

TOKEN = "cluster-secret-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Q = [{"role": "user", "content": "Hi"}]


@pytest.fixture()
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMRELAY_REGISTRATION_TOKEN", TOKEN)


def test_registration_token_guards_controller_and_workers(procs: Procs, token_env: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol", wait=False)
    wait_for(lambda: any(w["name"] == worker for w in httpx.get(
        controller + "/worker_table", headers=AUTH).json()["workers"]), 60, "registration")
    # without the token: liveness only
    assert httpx.get(controller + "/test_connection").status_code == 200
    for path in ("/worker_table", "/list_models"):
        r = httpx.get(controller + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_registration_token"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    stranger = {"worker_name": "http://127.0.0.1:9", "check_heart_beat": True,
                "worker_status": {"model_names": ["smol"], "speed": 1, "queue_length": 0}}
    r = httpx.post(controller + "/register_worker", json=stranger)
    assert r.status_code == 401
    r = httpx.post(controller + "/register_worker", json=stranger,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    table = httpx.get(controller + "/worker_table", headers=AUTH).json()
    assert [w["name"] for w in table["workers"]] == [worker], "the stranger was not stored"
    # the worker's own endpoints need the token too
    assert httpx.post(worker + "/worker_generate", json={"prompt": "x"}).status_code == 401
    assert httpx.post(worker + "/worker_get_status", headers=AUTH).status_code == 200
    # a worker without the token is refused and says so
    monkeypatch.delenv("LLMRELAY_REGISTRATION_TOKEN")
    rogue, rogue_url = procs.worker(controller, "smol", wait=False)
    wait_for(lambda: "refused registration" in rogue.log(), 60, "the refusal in the log")
    assert not any(w["name"] == rogue_url for w in httpx.get(
        controller + "/worker_table", headers=AUTH).json()["workers"])
    # an API server with the token serves; the token never shows in any log
    monkeypatch.setenv("LLMRELAY_REGISTRATION_TOKEN", TOKEN)
    _, api = procs.api(controller)
    wait_for(lambda: "smol" in api_models(api), 15)
    client = openai.OpenAI(base_url=api + "/v1", api_key="x", max_retries=0)
    assert client.chat.completions.create(model="smol", messages=Q, max_tokens=2).choices
    for p in procs.all:
        assert TOKEN not in p.log()


def test_api_keys_from_env_and_file(procs: Procs, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol")
    wait_for(lambda: registered(controller, worker), 30)
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nfile-key-1\n\nfile-key-2\n")
    monkeypatch.setenv("LLMRELAY_API_KEYS", "env-key")
    _, api = procs.api(controller, extra=("--api-keys-file", str(keys)))
    wait_for(lambda: httpx.get(api + "/health", headers={"Authorization": "Bearer env-key"})
             .json()["models"], 15)  # the details are for admin keys (plain keys are)
    for key, ok in [("env-key", True), ("file-key-2", True), ("# team keys", False),
                    ("file-key", False), ("", False)]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(api + "/v1/models", headers=headers)
        assert (r.status_code == 200) == ok, key
    r = httpx.post(api + "/v1/chat/completions", headers={"Authorization": "Bearer env-key"},
                   json={"model": "smol", "messages": Q, "max_tokens": 1})
    assert r.status_code == 200
    for p in procs.all:
        log = p.log()
        assert "file-key-1" not in log and "env-key" not in log


def test_missing_api_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "llmrelay.cli", "api", "--port", str(free_port()),
                        "--api-keys-file", str(tmp_path / "nope.txt")],
                       capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if k != "LLMRELAY_API_KEYS"})
    assert r.returncode != 0
    assert "cannot read --api-keys-file" in r.stderr


def test_echoed_input_is_escaped_json(procs: Procs) -> None:
    """Model names and paths come back inside JSON strings, never as markup or broken JSON."""
    _, controller = procs.controller()
    _, api = procs.api(controller)
    evil = '<script>alert("x")</script>\u2028"}'
    r = httpx.post(api + "/v1/chat/completions", json={"model": evil, "messages": Q})
    assert r.headers["content-type"].startswith("application/json")
    assert r.status_code in (404, 503)
    assert isinstance(r.json()["error"]["message"], str)
    r = httpx.get(api + "/v1/%3Cscript%3E")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
