"""Models by name from a Hugging Face hub (issue 28), through real processes and a real hub:
olah (tests/hubmirror.py) serving git repositories built here from the bundled models, and the
real huggingface_hub client pointed at it with HF_ENDPOINT.

Repositories: test-org/tiny-GGUF (commit 1: SmolLM2 as tiny-Q4_1.gguf; commit 2 adds Gemma as
tiny-Q4_K_M.gguf), test-org/split-GGUF (SmolLM2 as a two-part split GGUF), test-org/minilm (the
all-MiniLM-L6-v2 HF folder), test-org/no-weights (a README and a tokenizer only).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from hubmirror import Mirror, RangeFront, bundled, commit, split_gguf

from conftest import Procs, free_port, wait_for

PULL = [sys.executable, "-m", "llmrelay.cli", "pull"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("hub")
    root = work / "mirrors"
    models = bundled()
    repos = root / "models" / "test-org"
    first = commit(repos / "tiny-GGUF", {"README.md": "# tiny\n",
                                         "tiny-Q4_1.gguf": models["smollm2"]}, "Q4_1")
    second = commit(repos / "tiny-GGUF", {"tiny-Q4_K_M.gguf": models["gemma3-270m"]}, "Q4_K_M")
    parts = split_gguf(models["smollm2"], work / "split" / "smol-Q4_1.gguf")
    commit(repos / "split-GGUF", {"README.md": "# split\n", **{p.name: p for p in parts}}, "split")
    minilm = models["all-minilm-l6-v2"]
    commit(repos / "minilm", {str(p.relative_to(minilm)): p for p in minilm.rglob("*")
                              if p.is_file()}, "minilm")
    commit(repos / "no-weights", {"README.md": "# nothing\n", "tokenizer.json": "{}"}, "empty")
    mirror = Mirror(root, work)
    try:
        yield {"url": mirror.url, "first": first, "second": second, "mirror": mirror,
               "smol": models["smollm2"], "parts": parts}
    finally:
        mirror.stop()


def hub_env(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=url, HF_HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    return env


def pull(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PULL, *args], env=env, capture_output=True, text=True, timeout=300)


def snapshot_files(home: Path, repo: str) -> dict[str, list[str]]:
    base = home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots"
    return {s.name: sorted(p.relative_to(s).as_posix() for p in s.rglob("*") if p.is_file())
            for s in base.iterdir()} if base.is_dir() else {}


def test_planning_on_the_hub_picks_the_documented_quantization(hub: dict, tmp_path: Path) -> None:
    """The repositories' real listings from the mirror: Q4_K_M by default, `:QUANT` (any case)
    picks its file, split parts go together, an unknown quant and a repository without
    weights say what there is. Nothing is downloaded."""
    script = """
import json
from llmrelay.worker import hub
out = {}
for name in ["test-org/tiny-GGUF", "test-org/tiny-GGUF:q4_1", "test-org/split-GGUF",
             "test-org/tiny-GGUF:Q8_0", "test-org/no-weights", "test-org/minilm"]:
    ref = hub.parse_ref(name)
    try:
        p = hub.plan(ref, hub.remote_files(ref, None))
        out[name] = {"kind": p.kind, "main": p.main, "files": sorted(p.files)}
    except hub.HubError as e:
        out[name] = {"error": str(e)}
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", script], env=hub_env(hub["url"], tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["test-org/tiny-GGUF"]["main"] == "tiny-Q4_K_M.gguf"
    assert out["test-org/tiny-GGUF"]["files"] == ["tiny-Q4_K_M.gguf"]
    assert out["test-org/tiny-GGUF:q4_1"]["files"] == ["tiny-Q4_1.gguf"]
    assert out["test-org/split-GGUF"]["files"] == [p.name for p in hub["parts"]]
    assert out["test-org/split-GGUF"]["main"].endswith("-00001-of-00002.gguf")
    err = out["test-org/tiny-GGUF:Q8_0"]["error"]
    assert "no Q8_0" in err and "Q4_1" in err and "Q4_K_M" in err
    err = out["test-org/no-weights"]["error"]
    assert "holds no weights" in err and "tokenizer.json" in err and "README.md" in err
    assert out["test-org/minilm"]["kind"] == "hf" and "model.safetensors" in \
        out["test-org/minilm"]["files"]


def test_worker_serves_a_repository_by_name_and_quant(hub: dict, procs: Procs, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker started with ORG/NAME:QUANT is listed as `downloading` (with its progress, a
    request for it a 503 with Retry-After), logs percentage lines, then answers; only that
    quantization's file was fetched."""
    for k, v in hub_env(hub["url"], tmp_path / "hf").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _, controller = procs.controller()
    _, api = procs.api(controller)
    worker, url = procs.worker(controller, names="", model="test-org/tiny-GGUF:Q4_1", wait=False)
    seen: dict = {}

    def downloading() -> bool:
        for m in httpx.get(api + "/v1/models").json()["data"]:
            if m["id"] == "tiny-GGUF:Q4_1" and m.get("state") == "downloading":
                seen.update(m)
                return True
        return False

    wait_for(downloading, 120, "the model listed as downloading")
    assert seen["download"]["total_bytes"] == hub["smol"].stat().st_size
    r = httpx.post(api + "/v1/chat/completions", json={
        "model": "tiny-GGUF:Q4_1", "messages": [{"role": "user", "content": "Hi"}]})
    if r.status_code != 200:  # it may have loaded meanwhile
        assert r.status_code == 503 and "download" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_downloading" and r.headers["retry-after"]
    client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=120)
    wait_for(lambda: any(m.id == "tiny-GGUF:Q4_1" and getattr(m, "state", "") == "loaded"
                         for m in client.models.list().data), 180, "the model served")
    answer = client.chat.completions.create(
        model="tiny-GGUF:Q4_1", messages=[{"role": "user", "content": "Say hello"}], max_tokens=5)
    assert answer.choices[0].message.content
    assert list(snapshot_files(tmp_path / "hf", "test-org/tiny-GGUF").values()) == \
        [["tiny-Q4_1.gguf"]]
    log = worker.log()
    assert "downloading test-org/tiny-GGUF:Q4_1: 100%" in log, log[-2000:]


def test_up_loads_an_on_demand_hub_model_split_gguf(hub: dict, tmp_path: Path) -> None:
    """`llmrelay up` with an on-demand model named on the hub (a split GGUF): its host shows it
    `downloading`, the waiting request gets its answer, `up`'s output has percentage lines and
    `llmrelay models list` shows the cache."""
    api_port, ctl_port = free_port(), free_port()
    stack = tmp_path / "stack.toml"
    stack.write_text(f"""
[controller]
port = {ctl_port}
heartbeat_interval = 1
[api]
port = {api_port}
[[worker]]
model_path = "test-org/split-GGUF"
model_names = ["split"]
load = "on-demand"
context_length = 512
""")
    env = hub_env(hub["url"], tmp_path / "hf")
    out = tmp_path / "up.out"
    with open(out, "wb") as f:
        up = subprocess.Popen([sys.executable, "-m", "llmrelay.cli", "up", str(stack), "--log-dir",
                               str(tmp_path / "logs")], env=env, stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True)
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_for(lambda: "llmrelay is up" in out.read_text(), 120, "the stack up")
        client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=300)
        states: list[str] = []
        result: dict = {}

        def ask() -> None:
            try:
                result["answer"] = client.chat.completions.create(
                    model="split", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            except Exception as e:  # noqa: BLE001 - reported below
                result["error"] = e

        t = threading.Thread(target=ask)
        t.start()
        while t.is_alive():
            for m in httpx.get(api + "/v1/models").json()["data"]:
                if m["id"] == "split" and (not states or states[-1] != m["state"]):
                    states.append(m["state"])
            time.sleep(0.05)
        t.join()
        assert "error" not in result, result
        assert result["answer"].choices[0].message.content
        assert "downloading" in states, states
        text = out.read_text()
        assert "downloading split: 100%" in text, text[-3000:]
        listing = subprocess.run([sys.executable, "-m", "llmrelay.cli", "models", "list",
                                  "--controller-address", f"http://127.0.0.1:{ctl_port}"],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert "split" in listing.stdout and "loaded" in listing.stdout, listing
        assert "test-org/split-GGUF" in listing.stdout and "00002-of-00002" in listing.stdout
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()


def test_pull_resumes_an_interrupted_download(hub: dict, tmp_path: Path) -> None:
    """`llmrelay pull` killed half-way leaves a partial blob, never a file in the snapshot; the
    next pull fetches only the rest (fewer bytes from the hub) and the file is whole; then the
    cache serves it offline."""
    front = RangeFront(hub["url"])
    home = tmp_path / "hf"
    env = hub_env(front.url, home)
    size = hub["smol"].stat().st_size
    blobs = home / "hub" / "models--test-org--tiny-GGUF" / "blobs"
    try:
        first = subprocess.Popen([*PULL, "test-org/tiny-GGUF:Q4_1"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def partial() -> bool:
            return any(b.stat().st_size > size // 4 for b in blobs.glob("*.incomplete"))

        wait_for(partial, 120, "a quarter of the file downloaded")
        first.kill()
        first.wait()
        assert snapshot_files(home, "test-org/tiny-GGUF") in ({}, {hub["first"]: []},
                                                               {hub["second"]: []})
        kept = sum(b.stat().st_size for b in blobs.glob("*.incomplete"))
        before = front.sent
        r = pull(env, "test-org/tiny-GGUF:Q4_1")
        assert r.returncode == 0, r.stderr
        fetched = front.sent - before
        assert fetched == size - kept and fetched < size
        snap = home / "hub" / "models--test-org--tiny-GGUF" / "snapshots" / hub["second"]
        assert hashlib.sha256((snap / "tiny-Q4_1.gguf").read_bytes()).digest() == \
            hashlib.sha256(hub["smol"].read_bytes()).digest()
        assert "downloading test-org/tiny-GGUF:Q4_1: 100%" in r.stderr and str(snap) in r.stdout
    finally:
        front.stop()
    offline = pull(hub_env(hub["url"], home, HF_HUB_OFFLINE="1"), "test-org/tiny-GGUF:Q4_1")
    assert offline.returncode == 0, offline.stderr


def test_revision_picks_a_given_commit(hub: dict, tmp_path: Path) -> None:
    """At the first commit the repository had one quantization: no quant needed, and the
    snapshot is that commit's."""
    r = pull(hub_env(hub["url"], tmp_path / "hf"), "test-org/tiny-GGUF", "--revision",
             hub["first"])
    assert r.returncode == 0, r.stderr
    assert snapshot_files(tmp_path / "hf", "test-org/tiny-GGUF") == {hub["first"]: ["tiny-Q4_1.gguf"]}


def test_errors_say_what_to_do(hub: dict, tmp_path: Path) -> None:
    """Not on the hub: the endpoint and the spelling; no network: what the cache holds and
    HF_ENDPOINT; a repository without weights: what it holds; a worker says the same."""
    r = pull(hub_env(hub["url"], tmp_path / "hf"), "test-org/no-such-model")
    assert r.returncode != 0
    assert "not a model repository on " + hub["url"] in r.stderr and "spelling" in r.stderr
    down = f"http://127.0.0.1:{free_port()}"
    r = pull(hub_env(down, tmp_path / "hf"), "test-org/tiny-GGUF:Q4_1")
    assert r.returncode != 0
    assert f"{down} is not reachable" in r.stderr and "HF_ENDPOINT" in r.stderr
    assert "does not hold test-org/tiny-GGUF" in r.stderr
    w = subprocess.run([sys.executable, "-m", "llmrelay.cli", "worker", "--no-register",
                        "--port", str(free_port()), "--model-path", "test-org/no-weights"],
                       env=hub_env(hub["url"], tmp_path / "hf"), capture_output=True, text=True,
                       timeout=120)
    assert w.returncode == 2
    assert "cannot start the worker" in w.stderr and "holds no weights" in w.stderr


def test_worker_loads_an_hf_folder_repository(hub: dict, tmp_path: Path) -> None:
    """An HF folder repository goes to the transformers engine (embeddings)."""
    port = free_port()
    log = open(tmp_path / "worker.log", "wb")
    w = subprocess.Popen([sys.executable, "-m", "llmrelay.cli", "worker", "--no-register",
                          "--port", str(port), "--model-path", "test-org/minilm"],
                         env=hub_env(hub["url"], tmp_path / "hf"), stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.post(url + "/worker_get_status").status_code == 200, 240,
                 "the worker")
        status = httpx.post(url + "/worker_get_status").json()
        assert status["model_names"] == ["minilm"]
        assert status["llmrelay"]["engine"] == "transformers"
        r = httpx.post(url + "/worker_get_embeddings", json={"model": "minilm", "input": ["hi"]},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["embedding"][0]) == 384
    finally:
        w.terminate()
        w.wait(30)


def test_a_vision_repository_brings_its_projector(hub: dict, procs: Procs, tmp_path: Path,
                                                  tiny_mmproj: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF repository with a vision projector (`mmproj*.gguf`): a worker started by its name
    fetches the projector with the model and reads images with it (no --mmproj)."""
    from conftest import TINY_VLM_IMAGE_TOKENS, tiny_vlm_url

    commit(hub["mirror"].root / "models" / "test-org" / "vision-GGUF",
           {"vision-Q4_1.gguf": hub["smol"], "mmproj-vision-f16.gguf": tiny_mmproj}, "vision")
    for k, v in hub_env(hub["url"], tmp_path / "hf").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _, controller = procs.controller()
    _, api = procs.api(controller)
    procs.worker(controller, names="vision", model="test-org/vision-GGUF", load_timeout=180)
    wait_for(lambda: any(m["id"] == "vision" and "vision" in m.get("features", [])
                         for m in httpx.get(api + "/v1/models").json()["data"]), 60,
             "the model served, reading images")
    assert list(snapshot_files(tmp_path / "hf", "test-org/vision-GGUF").values()) == \
        [["mmproj-vision-f16.gguf", "vision-Q4_1.gguf"]]
    client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=120)
    url = tiny_vlm_url("red")

    def prompt(content: object) -> int:
        r = client.chat.completions.create(model="vision", max_tokens=1, temperature=0,
                                           messages=[{"role": "user", "content": content}])  # type: ignore[misc]
        assert r.usage is not None
        return r.usage.prompt_tokens

    text = [{"type": "text", "text": "What is this?"}]
    assert prompt([{"type": "image_url", "image_url": {"url": url}}, *text]) > \
        prompt(text) + TINY_VLM_IMAGE_TOKENS - 1
