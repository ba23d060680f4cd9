"""Models on demand through real processes and real models (issue 19): one controller, one API
server (and a second one with API keys), and four hosts that each own a memory budget, sized in
this test from the hosts' own estimates:

- `one`: budget for one of its three SmolLM2 models (a1, b1, c1): llama.cpp's router tests
  with `models_max = 1`, ported (busy models are not evicted, loads are queued first come
  first served, coalesced, dropped when their clients leave; a stopping model is not used);
- `two`: budget for two of SmolLM2 x, SmolLM2 y and Gemma 3 270M g: LRU eviction of exactly one
  idle model, a stream that goes on while another model is swapped in, 8 first requests;
- `pin`: a pinned SmolLM2 beside two others with room for one of them;
- `misc`: a corrupt GGUF, a model too big for the budget, a model loaded only by an admin, one
  with a keep_alive ceiling, the HF folder on transformers and MiniLM embeddings;
- `nokey`: a host without an admin key (its admin endpoints are off).

Scenarios wait for states with generous timeouts and never assert on durations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import HEARTBEAT, Procs, registered, wait_for
from llmrelay.ondemand.catalog import spec_from_entry
from llmrelay.ondemand.estimate import estimate
from llmrelay.worker.managed import free_port
from llmrelay.worker.models import resolve

SMALL = {"context_length": 512, "limit_worker_concurrency": 2, "n_threads": 1}
COUNT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy SmolLM2 counts on to max_tokens
HI = [{"role": "user", "content": "Say hello."}]
KEY = "sk-od-user"


def need(entry: dict[str, Any]) -> int:
    return estimate(spec_from_entry(dict(entry), "test")).total


def catalog(path: Path, models: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, entry in models.items():
        lines.append("[[model]]")
        lines.append(f"model_names = [{json.dumps(name)}]")
        for k, v in entry.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Host:
    url: str
    key: str | None

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None,
              key: str | None = "own") -> httpx.Response:
        key = self.key if key == "own" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, json=body, headers=headers, timeout=300)

    def models(self) -> dict[str, dict[str, Any]]:
        r = self.admin("GET", "/admin/models")
        assert r.status_code == 200, r.text
        return {m["name"]: m for m in r.json()["models"]}

    def load(self, model: str) -> None:
        r = self.admin("POST", "/admin/load", {"model": model})
        assert r.status_code == 200 and r.json()["success"] is True, r.text

    def unload(self, model: str) -> httpx.Response:
        return self.admin("POST", "/admin/unload", {"model": model})


@dataclass
class Cluster:
    controller: str
    api: str
    keyed_api: str
    hosts: dict[str, Host]
    procs: Procs
    models_dir: Path
    fenced_api: str  # keys from a keys file: "fenced" may use the model "keyed" only
    fenced_key: str

    def client(self, timeout: float = 300, key: str = "none", api: str | None = None
               ) -> openai.OpenAI:
        return openai.OpenAI(base_url=(api or self.api) + "/v1", api_key=key, max_retries=0,
                             timeout=timeout)

    def state(self, model: str) -> str:
        data = httpx.get(self.api + "/v1/models", timeout=10).json()["data"]
        return next(m["state"] for m in data if m["id"] == model)

    def wait_state(self, model: str, *states: str, timeout: float = 180) -> None:
        wait_for(lambda: self.state(model) in states, timeout, f"{model} to be {states}")

    def chat(self, model: str, max_tokens: int = 4, **kw: Any) -> Any:
        return self.client().chat.completions.create(model=model, messages=HI,
                                                      max_tokens=max_tokens, temperature=0, **kw)


@pytest.fixture(scope="module")
def smol_hf_dir(smol_hf: Path) -> Path:
    return smol_hf  # conftest's, made once per session


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, smol_hf_dir: Path) -> Iterator[Cluster]:
    pytest.importorskip("torch")
    base = tmp_path_factory.mktemp("ondemand")
    smol = {"model_path": "smollm2", **SMALL}
    gemma = {"model_path": "gemma3-270m", **SMALL}
    s, g = need(smol), need(gemma)
    broken = base / "broken.gguf"  # a header that reads, tensors cut off: llama.cpp refuses it
    broken.write_bytes(resolve("smollm2").path.read_bytes()[:20_000_000])
    hf = {"model_path": str(smol_hf_dir), "engine": "transformers", **SMALL}
    minilm = {"model_path": "all-minilm-l6-v2", "limit_worker_concurrency": 2, "n_threads": 1}
    misc = {"broken": {"model_path": str(broken), **SMALL},
            "huge": {"model_path": "smollm2", "context_length": 65536, "n_threads": 1},
            "manual": {**smol, "load": "manual"},
            "keyed": smol,
            "fenced": smol,  # never loaded: only a key that may not use it asks for it
            "brief": {**smol, "idle_unload": "1h", "keep_alive_max": "1s"},
            "smolhf": hf, "minilm": minilm}
    misc_budget = need(hf) + need(minilm) + 2 * s + s // 2
    hosts_spec = {
        "one": ({"a1": smol, "b1": smol, "c1": smol}, s + s // 2, "adm-one"),
        "two": ({"x": smol, "y": smol, "g": gemma, "z": smol}, s + g + s // 2, "adm-two"),
        "pin": ({"p": {**smol, "pin": True}, "q": smol, "r": smol}, 2 * s + s // 2, "adm-pin"),
        "nokey": ({"n1": smol}, s + s // 2, None),
        "misc": (misc, misc_budget, "adm-misc"),
    }
    procs = Procs(base)
    try:
        _, controller = procs.controller()
        hosts: dict[str, Host] = {}
        for name, (models, budget, key) in hosts_spec.items():
            port = free_port()
            argv = ["host", "--port", str(port), "--controller-address", controller,
                    "--heartbeat-interval", HEARTBEAT, "--max-memory", str(budget),
                    "--catalog", str(catalog(base / f"{name}.toml", models)),
                    "--worker-log-dir", str(base / f"{name}-workers"), "--shutdown-timeout", "10"]
            if key:
                argv += ["--admin-key", key]
            procs._start(f"host-{name}", argv)
            hosts[name] = Host(f"http://127.0.0.1:{port}", key)
        for name, h in hosts.items():
            wait_for(lambda h=h: registered(controller, h.url), 60, f"host {name}")
        _, api = procs.api(controller)
        _, keyed_api = procs.api(controller, extra=("--api-keys", KEY))
        keys_file = base / "keys.toml"
        added = subprocess.run([str(Path(sys.executable).parent / "llmrelay"), "keys", "add", "fenced",
                                "--file", str(keys_file), "--models", "keyed"],
                               check=True, capture_output=True, text=True, timeout=60)
        fenced_key = added.stdout.splitlines()[0].strip()
        _, fenced_api = procs.api(controller, extra=("--api-keys-file", str(keys_file)))
        every = {m for models, _, _ in hosts_spec.values() for m in models}
        wait_for(lambda: every <= {m["id"] for m in httpx.get(api + "/v1/models").json()["data"]},
                 30, "declared models in the API")
        c = Cluster(controller, api, keyed_api, hosts, procs, base, fenced_api, fenced_key)
        c.wait_state("p", "loaded")  # pinned: loaded at the host's start
        yield c
    finally:
        procs.stop_all()


class Bg:
    """One request in a thread: its result or error, and when it finished."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - reported by ok()
            self.error = e
        self.done_at = time.monotonic()

    def start(self) -> Bg:
        self.thread.start()
        return self

    def ok(self, timeout: float = 300) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not finish"
        assert self.error is None, repr(self.error)
        return self.result


class Busy:
    """A long streamed completion (counting on: it runs to max_tokens) that keeps a model busy;
    it has started generating when this returns."""

    def __init__(self, c: Cluster, model: str, tokens: int = 60) -> None:
        self.tokens = tokens
        stream = c.client().completions.create(
            model=model, prompt=COUNT, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        self.chunks = iter(stream)
        self.first = next(self.chunks)  # the model is generating
        self.bg = Bg(self._rest).start()

    def _rest(self) -> tuple[str, Any]:
        text, usage = "", None
        for ch in self.chunks:
            if ch.choices:
                text += ch.choices[0].text or ""
            if ch.usage:
                usage = ch.usage
        return text, usage

    def done(self) -> str:
        text, usage = self.bg.ok()
        assert usage is not None and usage.completion_tokens == self.tokens, usage
        return text


def unload_all(c: Cluster, host: str) -> None:
    h = c.hosts[host]
    for name, m in h.models().items():
        if m["state"] != "unloaded" and not m["pin"]:
            assert h.unload(name).status_code == 200
    for name, m in h.models().items():
        if not m["pin"]:
            c.wait_state(name, "unloaded")


# ---- declared models -----------------------------------------------------------------------------


def test_declared_models_are_listed_with_their_state(cluster: Cluster) -> None:
    data = {m["id"]: m for m in httpx.get(cluster.api + "/v1/models").json()["data"]}
    assert data["a1"]["state"] == "unloaded" and data["p"]["state"] == "loaded"
    assert data["g"]["object"] == "model"
    one = httpx.get(cluster.api + "/v1/models/smolhf").json()
    assert one["id"] == "smolhf" and one["state"] in ("unloaded", "loading", "loaded")
    out = subprocess.run([sys.executable, "-m", "llmrelay.cli", "status", "--controller-address",
                          cluster.controller], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "models loaded on demand" in out.stdout
    assert any(line.split()[:2] == ["p", "loaded"] for line in out.stdout.splitlines())


# ---- llama.cpp's router tests, ported ---------------------------------------------------------------


@pytest.mark.parametrize("model,success", [("a1", True), ("non-existent/model", False)])
def test_router_chat_completion_stream(cluster: Cluster, model: str, success: bool) -> None:
    content, error = "", None
    try:
        for ch in cluster.client().chat.completions.create(
                model=model, messages=HI, max_tokens=16, temperature=0, stream=True):
            if ch.choices:
                choice = ch.choices[0]
                if choice.finish_reason in ("stop", "length"):
                    assert not choice.delta.content
                else:
                    content += choice.delta.content or ""
    except openai.APIError as e:
        error = e
    if success:
        assert error is None and content
    else:
        assert isinstance(error, openai.NotFoundError) and content == ""


def test_router_unload_model(cluster: Cluster) -> None:
    h = cluster.hosts["one"]
    h.load("a1")
    cluster.wait_state("a1", "loaded")
    r = h.unload("a1")
    assert r.status_code == 200 and r.json()["success"] is True
    cluster.wait_state("a1", "unloaded")


def test_router_queue_does_not_evict_busy_model(cluster: Cluster) -> None:
    unload_all(cluster, "one")
    cluster.hosts["one"].load("a1")
    busy = Busy(cluster, "a1")
    queued = Bg(lambda: cluster.chat("b1")).start()  # no room, a1 busy: waits, not evicting
    busy.done()  # had a1 been evicted while serving, its own request would have died
    assert queued.ok().choices[0].message.content
    cluster.wait_state("b1", "loaded")
    assert cluster.state("a1") == "unloaded"


def test_router_queue_coalesces_requests_for_same_model(cluster: Cluster) -> None:
    unload_all(cluster, "two")
    h = cluster.hosts["two"]
    h.load("x")
    h.load("y")
    busy = Busy(cluster, "x")  # x busy: y is the only model that can be given up
    waiters = [Bg(lambda: cluster.chat("g")).start() for _ in range(3)]
    busy.done()
    for w in waiters:
        assert w.ok().choices[0].message.content
    cluster.wait_state("g", "loaded")
    # one load for 3 requests means one eviction: y goes, x is left alone
    assert cluster.state("x") == "loaded" and cluster.state("y") == "unloaded"
    assert h.models()["g"]["loads"] == 1 and h.models()["x"]["evictions"] == 0


def test_router_queue_client_disconnect_keeps_model(cluster: Cluster) -> None:
    unload_all(cluster, "one")
    h = cluster.hosts["one"]
    h.load("a1")
    loads_b = h.models()["b1"]["loads"]
    busy = Busy(cluster, "a1", tokens=100)
    with pytest.raises(openai.APITimeoutError):  # queues behind a1, gives up long before
        cluster.client(timeout=1).chat.completions.create(model="b1", messages=HI, max_tokens=4)
    # nobody waits for b1 any more: its load leaves the host's queue
    wait_for(lambda: not h.models()["b1"]["queued"], 30, "b1 to leave the queue")
    busy.done()
    assert cluster.state("a1") == "loaded" and cluster.state("b1") == "unloaded"
    assert h.models()["b1"]["loads"] == loads_b


def test_router_queue_is_fifo(cluster: Cluster) -> None:
    unload_all(cluster, "one")
    h = cluster.hosts["one"]
    h.load("a1")
    busy = Busy(cluster, "a1")
    first = Bg(lambda: cluster.chat("b1")).start()
    wait_for(lambda: h.models()["b1"]["queued"], 30, "b1 queued")  # arrival order is certain
    second = Bg(lambda: cluster.chat("c1")).start()
    wait_for(lambda: h.models()["c1"]["queued"], 30, "c1 queued")
    busy.done()
    first.ok()
    second.ok()
    assert first.done_at < second.done_at, "the queue was not served in arrival order"


def test_router_fast_path_load_not_evicted_before_proxy(cluster: Cluster) -> None:
    unload_all(cluster, "one")
    req_a = Bg(lambda: cluster.chat("a1")).start()
    cluster.wait_state("a1", "loaded")
    req_b = Bg(lambda: cluster.chat("b1")).start()
    assert req_a.ok().choices[0].message.content
    assert req_b.ok().choices[0].message.content


def test_router_does_not_proxy_into_stopping_model(cluster: Cluster) -> None:
    unload_all(cluster, "one")
    h = cluster.hosts["one"]
    h.load("a1")
    cluster.wait_state("a1", "loaded")
    unload = Bg(lambda: h.unload("a1")).start()
    wait_for(lambda: h.models()["a1"]["state"] in ("unloading", "unloaded"), 30, "a1 stopping")
    r = cluster.chat("a1")  # waits for the stop, then loads it again
    assert r.choices[0].message.content
    assert unload.ok().status_code == 200


def test_router_queue_two_waiters_share_one_eviction(cluster: Cluster) -> None:
    unload_all(cluster, "one")
    cluster.hosts["one"].load("a1")
    first = Bg(lambda: cluster.chat("b1")).start()
    second = Bg(lambda: cluster.chat("c1")).start()
    first.ok()
    second.ok()
    assert cluster.state("a1") == "unloaded"


def test_router_no_models_autoload(cluster: Cluster) -> None:
    with pytest.raises(openai.BadRequestError, match="llmrelay models load manual"):
        cluster.chat("manual")
    assert cluster.hosts["misc"].models()["manual"]["loads"] == 0
    cluster.hosts["misc"].load("manual")
    assert cluster.chat("manual").choices[0].message.content


def test_router_api_key_required(cluster: Cluster) -> None:
    h = cluster.hosts["misc"]
    with pytest.raises(openai.AuthenticationError):
        cluster.client(api=cluster.keyed_api).chat.completions.create(
            model="keyed", messages=HI, max_tokens=4)
    assert h.models()["keyed"]["loads"] == 0  # a stranger cannot make a host load a model
    r = cluster.client(api=cluster.keyed_api, key=KEY).chat.completions.create(
        model="keyed", messages=HI, max_tokens=4)
    assert r.choices[0].message.content and h.models()["keyed"]["loads"] == 1


def test_a_key_cannot_make_a_host_load_a_model_it_may_not_use(cluster: Cluster) -> None:
    """Keys with model lists (issue 20) in front of models on demand (issue 19): a request for
    a declared model the key may not use is a 404 naming only the key's models, and the host
    loads nothing; the key's own model answers."""
    h = cluster.hosts["misc"]
    assert cluster.state("fenced") != "loaded" and h.models()["fenced"]["loads"] == 0
    c = cluster.client(api=cluster.fenced_api, key=cluster.fenced_key)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="fenced", messages=HI, max_tokens=4)
    assert e.value.code == "model_not_found"
    assert "fenced" not in e.value.message.split("does not exist.")[1]  # only the key's models
    assert h.models()["fenced"]["loads"] == 0
    assert [m.id for m in c.models.list()] == ["keyed"]
    r = c.chat.completions.create(model="keyed", messages=HI, max_tokens=4)
    assert r.choices[0].message.content


# ---- the issue's own scenarios ----------------------------------------------------------------------


def test_eight_concurrent_first_requests_one_load(cluster: Cluster) -> None:
    h = cluster.hosts["two"]
    before = h.models()["z"]["loads"]
    assert cluster.state("z") == "unloaded"
    reqs = [Bg(lambda: cluster.chat("z")).start() for _ in range(8)]
    answers = [r.ok() for r in reqs]
    assert all(a.choices[0].message.content for a in answers)
    assert h.models()["z"]["loads"] == before + 1


def test_budget_for_two_evicts_the_lru_idle_one_and_nothing_else(cluster: Cluster) -> None:
    unload_all(cluster, "two")
    h = cluster.hosts["two"]
    cluster.chat("x")
    cluster.chat("y")
    cluster.chat("x")  # y is now the least recently used
    before = h.models()
    assert cluster.chat("g").choices[0].message.content
    after = h.models()
    assert after["y"]["state"] == "unloaded" and after["y"]["evictions"] == \
        before["y"]["evictions"] + 1
    assert after["x"]["state"] == "loaded" and after["x"]["pid"] == before["x"]["pid"]
    assert after["x"]["evictions"] == before["x"]["evictions"]


def test_stream_goes_on_while_another_model_is_swapped_in(cluster: Cluster) -> None:
    unload_all(cluster, "two")
    h = cluster.hosts["two"]
    cluster.chat("y")
    cluster.chat("x")
    pid = h.models()["x"]["pid"]
    busy = Busy(cluster, "x", tokens=120)
    swapped = cluster.chat("g")  # evicts y (idle), loads g, answers
    assert swapped.choices[0].message.content
    text = busy.done()  # every token of the stream arrived
    assert text.count(",") > 20
    m = h.models()
    assert m["x"]["pid"] == pid and m["y"]["state"] == "unloaded" and m["g"]["state"] == "loaded"


def test_pinned_model_is_never_evicted(cluster: Cluster) -> None:
    h = cluster.hosts["pin"]
    before = h.models()
    assert before["p"]["state"] == "loaded"
    for model in ("q", "r", "q", "r"):  # room for one beside p: each request swaps
        assert cluster.chat(model).choices[0].message.content
    after = h.models()
    assert after["p"]["pid"] == before["p"]["pid"] and after["p"]["evictions"] == 0
    assert after["p"]["loads"] == 1 and after["p"]["state"] == "loaded"
    assert after["q"]["evictions"] >= 1 and after["r"]["evictions"] >= 1


def test_too_big_model_is_refused_with_the_figures_and_the_flag(cluster: Cluster) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        cluster.chat("huge")
    msg = str(e.value)
    assert "Model 'huge' needs about" in msg and "GiB" in msg and "budget" in msg
    assert "--max-memory" in msg and "context_length = " in msg
    assert cluster.hosts["misc"].models()["huge"]["loads"] == 0


def test_corrupt_model_answers_503_with_the_cause_and_others_keep_serving(cluster: Cluster) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        cluster.chat("broken")
    assert e.value.status_code == 503
    assert "broken" in str(e.value) and "could not load" in str(e.value)
    assert cluster.chat("keyed").choices[0].message.content  # the others serve on
    r = httpx.post(cluster.api + "/v1/chat/completions", json={
        "model": "broken", "messages": HI, "max_tokens": 4}, timeout=120)
    assert r.status_code == 503 and "could not load" in r.json()["error"]["message"]
    assert r.headers.get("retry-after")  # tried again after a back-off, not a dead model forever


def test_keep_alive_is_honoured_up_to_the_admins_ceiling(cluster: Cluster) -> None:
    # idle_unload 1h, but a client asks to keep it forever: the ceiling (1 s) wins
    r = httpx.post(cluster.api + "/v1/chat/completions", json={
        "model": "brief", "messages": HI, "max_tokens": 4, "keep_alive": -1}, timeout=300)
    assert r.status_code == 200, r.text
    cluster.wait_state("brief", "unloaded", timeout=60)


def test_hf_folder_and_embeddings_load_on_demand(cluster: Cluster) -> None:
    emb = cluster.client().embeddings.create(model="minilm", input=["hello", "world"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    r = cluster.chat("smolhf", max_tokens=8)
    assert r.choices[0].message.content
    models = cluster.hosts["misc"].models()
    assert models["smolhf"]["state"] == "loaded" and models["smolhf"]["memory_bytes"]


def test_admin_endpoints_need_the_admin_key(cluster: Cluster) -> None:
    h = cluster.hosts["misc"]
    for key in (None, "wrong", KEY):  # no key, a wrong one, a user's API key
        for method, path, body in (("POST", "/admin/load", {"model": "keyed"}),
                                   ("POST", "/admin/unload", {"model": "keyed"}),
                                   ("POST", "/admin/pin", {"model": "keyed"}),
                                   ("POST", "/admin/unpin", {"model": "keyed"}),
                                   ("GET", "/admin/models", None)):
            r = h.admin(method, path, body, key=key)
            assert r.status_code == 401, (key, path, r.text)
            assert r.json()["error"]["code"] == "invalid_admin_key"
    r = cluster.hosts["nokey"].admin("POST", "/admin/unload", {"model": "n1"})
    assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]
    env = dict(os.environ, LLMRELAY_ADMIN_KEY=h.key or "")
    cli = [sys.executable, "-m", "llmrelay.cli", "models"]
    out = subprocess.run([*cli, "load", "manual", "--controller-address", cluster.controller],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "manual: loaded" in out.stdout, out.stderr
    out = subprocess.run([*cli, "list", "--host-address", h.url], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0 and "budget" in out.stdout and "manual" in out.stdout
    for action, said in (("pin", "manual: loaded, pinned"), ("unpin", "manual: loaded, not pinned")):
        out = subprocess.run([*cli, action, "manual", "--host-address", h.url],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0 and said in out.stdout, out.stderr
        assert h.models()["manual"]["pin"] is (action == "pin")
    out = subprocess.run([*cli, "unload", "manual", "--host-address", h.url, "--admin-key",
                          "wrong"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Incorrect admin key" in out.stderr


# ---- llmrelay up ------------------------------------------------------------------------------------


def test_up_with_models_dir_and_an_on_demand_worker(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(resolve("smollm2").path, models / "tiny.gguf")
    c, a, h = free_port(), free_port(), free_port()
    stack = tmp_path / "stack.toml"
    stack.write_text(f"""
log_dir = "{tmp_path / 'logs'}"
[controller]
port = {c}
heartbeat_interval = 1
[api]
port = {a}
[host]
port = {h}
max_memory = "2GiB"
[[worker]]
model_path = "gemma3-270m"
model_names = ["gemma"]
load = "on-demand"
context_length = 512
n_threads = 1
""")
    env = dict(os.environ, LLMRELAY_STATE_DIR=str(tmp_path / "state"))
    env.pop("LLMRELAY_ADMIN_KEY", None)
    out = tmp_path / "up.out"
    proc = subprocess.Popen([sys.executable, "-m", "llmrelay.cli", "up", str(stack),
                             "--models-dir", str(models)], stdout=open(out, "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    api = f"http://127.0.0.1:{a}"
    try:
        wait_for(lambda: "llmrelay is up" in out.read_text() or proc.poll() is not None, 120,
                 "llmrelay up")
        assert "Loaded on demand: gemma, tiny" in out.read_text(), out.read_text()
        states = {m["id"]: m["state"] for m in httpx.get(api + "/v1/models").json()["data"]}
        assert states == {"gemma": "unloaded", "tiny": "unloaded"}
        client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4)
        assert r.choices[0].message.content
        listed = subprocess.run([sys.executable, "-m", "llmrelay.cli", "models", "list",
                                 "--controller-address", f"http://127.0.0.1:{c}"],
                                capture_output=True, text=True, env=env, timeout=60)
        assert listed.returncode == 0, listed.stderr  # the admin key from the state folder
        assert any(line.split()[:2] == ["tiny", "loaded"] for line in listed.stdout.splitlines())
        # `up` gave its API server the host's admin key: the web console's buttons work
        r = httpx.post(api + "/api/ops/models/pin", json={"model": "tiny"}, timeout=30)
        assert r.status_code == 200 and r.json()["pin"] is True, r.text
        wait_for(lambda: next(m for m in httpx.get(api + "/api/ops/models").json()["models"]
                              if m["model"] == "tiny")["pin"], 30, "the pin in the console")
        assert httpx.post(api + "/api/ops/models/unpin", json={"model": "tiny"},
                          timeout=30).json()["pin"] is False
    finally:
        proc.send_signal(2)
        proc.wait(60)
    assert "llmrelay stopped." in out.read_text()
