"""The `openai` engine (any OpenAI-compatible server behind our controller) and managed mode.

Real processes throughout: llama.cpp's own server (`python -m llama_cpp.server`, SmolLM2)
started by a worker as its managed child, the session's llmrelay stack as a remote upstream,
and a plain llama.cpp server that is stopped and started again. vLLM cannot be installed here,
so its flag mapping is checked as a pure function and the managed mechanism is proven with
llama.cpp's server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from conftest import Proc, Procs, Stack, api_models, free_port, registered, wait_for
from llmrelay.api.errors import from_worker
from llmrelay.config import add_worker_args
from llmrelay.security import auth_headers
from llmrelay.serve import vllm_worker
from llmrelay.worker import managed as mg
from llmrelay.worker.engines.base import GenerationRequest
from llmrelay.worker.engines.openai import map_error
from llmrelay.worker.engines.openai.calls import Call
from llmrelay.worker.engines.openai.tokens import count_of, server_root
from llmrelay.worker.models import resolve

SMOL = str(resolve("smollm2").path)
# Mean pooling for SmolLM2 (a chat model with no pooling of its own), so llama.cpp's server
# answers one vector per input: enough to check the embeddings pass-through.
EMBED_ARGS = "--embedding true --kv_overrides llama.pooling_type=int:1"
LONG_PROMPT = "hello " * 1500  # over the 1024-token context given below


def status(worker: str) -> dict:
    return httpx.post(worker + "/worker_get_status", timeout=5).json()


def upstream_of(worker: str) -> dict:
    return status(worker)["llmrelay"]["upstream"]


def counted(usage: object, upstream: dict | None = None) -> None:
    """The seed clients' "usage counted" check: real counts (never a 0 that looks real), and
    the upstream's own figures when it gives them (`upstream`: its `usage` for the same greedy
    request, asked directly)."""
    u = usage if isinstance(usage, dict) else usage.model_dump()  # type: ignore[attr-defined]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0, u
    assert u.get("total_tokens", u["prompt_tokens"] + u["completion_tokens"]) == (
        u["prompt_tokens"] + u["completion_tokens"]), u
    if upstream is not None:
        assert (u["prompt_tokens"], u["completion_tokens"]) == (
            upstream["prompt_tokens"], upstream["completion_tokens"]), (u, upstream)


def direct_usage(base: str, path: str, body: dict) -> dict:
    """What the upstream itself says about a request (not streamed: llama.cpp's server gives
    usage only there)."""
    r = httpx.post(base + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def last_usage(stream: Iterator) -> tuple[str, object]:
    """A streamed answer's text and the usage on its last chunk (stream_options.include_usage)."""
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content if hasattr(c.choices[0], "delta")
                    else c.choices[0].text) or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def llama_server(port: int, log: Path, alias: str = "plain-smol") -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", SMOL, "--model_alias", alias,
             "--port", str(port), "--n_threads", "1", "--n_ctx", "1024",
             "--interrupt_requests", "false"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class Relay:
    controller: str
    api: str
    managed: str  # worker fronting a managed llama.cpp server, names managed-smol
    remote: str  # worker fronting the session stack's API (model smol), names relay-smol
    procs: Procs
    managed_proc: Proc

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0,
                             timeout=120)


@pytest.fixture(scope="module")
def relay(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    procs = Procs(tmp_path_factory.mktemp("upstream-logs"))
    try:
        _, controller = procs.controller()
        managed_proc, managed = procs.worker(controller, "managed-smol", extra=(
            "--managed", "llama-cpp-server", "--context-length", "1024",
            "--managed-args", EMBED_ARGS, "--upstream-check-interval", "0.5"))
        _, remote = procs.worker(controller, "relay-smol", extra=(
            "--upstream", stack.api + "/v1", "--upstream-model", "smol",
            "--upstream-check-interval", "0.5"))
        _, missing = procs.worker(controller, "relay-missing", extra=(
            "--upstream", stack.api + "/v1", "--upstream-model", "no-such-model"))
        for w in (managed, remote, missing):
            wait_for(lambda w=w: registered(controller, w), 60, f"worker {w}")
        _, api = procs.api(controller)
        wait_for(lambda: api_models(api) == {"managed-smol", "relay-smol", "relay-missing"}, 30,
                 "the relayed models in the API")
        yield Relay(controller, api, managed, remote, procs, managed_proc)
    finally:
        procs.stop_all()


# -- llama.cpp's server as a managed upstream ---------------------------------------------------

def test_tools_and_formats_pass_through_to_the_managed_server(relay: Relay) -> None:
    """The openai engine passes tools, tool_choice and response formats to the upstream, which
    enforces them its own way (llama-cpp-python's server: a named tool's schema, a JSON object
    or schema), and its tool calls come back in OpenAI's shape, streamed and not."""
    import jsonschema

    c = relay.client()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    kw = dict(model="managed-smol", temperature=0, max_tokens=60, tools=[tool],
              messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = c.chat.completions.create(**kw)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    streamed = "".join(d.function.arguments or "" for ch in c.chat.completions.create(
        stream=True, **kw) for choice in ch.choices for d in choice.delta.tool_calls or [])
    assert json.loads(streamed) == json.loads(calls[0].function.arguments)
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"]}
    r = c.chat.completions.create(
        model="managed-smol", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_managed_worker_is_ready_before_it_serves(relay: Relay) -> None:
    up = upstream_of(relay.managed)
    assert up["healthy"] is True and up["models"] == ["managed-smol"]
    assert up["managed"]["server"] == "llama-cpp-server" and pid_alive(up["managed"]["pid"])
    assert "--n_ctx 1024" in up["managed"]["command"]
    assert status(relay.managed)["llmrelay"]["ready"] is True


def test_chat_and_completions_through_llamacpp_server(relay: Relay) -> None:
    client = relay.client()
    base = upstream_of(relay.managed)["base_url"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="managed-smol", messages=msgs, max_tokens=12,
                                          temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    # Usage counted: llama.cpp's server streams none, so the worker asks it (issue 17).
    chat_usage = direct_usage(base, "/chat/completions", {
        "model": "managed-smol", "messages": msgs, "max_tokens": 12, "temperature": 0})
    counted(full.usage, chat_usage)
    # Streamed, the same greedy answer arrives in pieces.
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="managed-smol", messages=msgs,
                                                max_tokens=12, temperature=0, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == text and finish == full.choices[0].finish_reason
    streamed, usage = last_usage(client.chat.completions.create(
        model="managed-smol", messages=msgs, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert streamed == text
    counted(usage, chat_usage)
    # Completions, with logprobs (llama.cpp's server takes no token-id prompts: see the relay).
    c = client.completions.create(model="managed-smol", prompt="Once upon a time",
                                  max_tokens=5, temperature=0, logprobs=2)
    assert c.choices[0].text and c.usage.completion_tokens == 5
    assert len(c.choices[0].logprobs.tokens) == 5
    text_usage = direct_usage(base, "/completions", {
        "model": "managed-smol", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})
    counted(c.usage, text_usage)
    streamed, usage = last_usage(client.completions.create(
        model="managed-smol", prompt="Once upon a time", max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert streamed == c.choices[0].text
    counted(usage, text_usage)


def test_count_token_and_tokenize_through_the_upstream_tokenizer(relay: Relay,
                                                                 stack: Stack) -> None:
    """/count_token, /tokenize and /detokenize ask the upstream's own endpoints (llama.cpp's
    server: /extras/tokenize and /extras/detokenize; another llmrelay: its /tokenize and
    /detokenize), also through the API server; chat messages are counted by the upstream (a
    one-token answer) and cannot be tokenized here (the upstream renders them)."""
    base = upstream_of(relay.managed)["base_url"].removesuffix("/v1")
    text = "How many tokens are in this sentence?"
    direct = httpx.post(base + "/extras/tokenize", json={"input": text}, timeout=30).json()
    r = httpx.post(relay.managed + "/count_token", json={"prompt": text}, timeout=30)
    assert r.json() == {"count": len(direct["tokens"]), "error_code": 0}
    r = httpx.post(relay.api + "/tokenize", json={"model": "managed-smol", "prompt": text})
    assert r.json()["tokens"] == direct["tokens"] and r.json()["max_model_len"] == 1024
    r = httpx.post(relay.api + "/detokenize", json={"model": "managed-smol",
                                                    "tokens": direct["tokens"]})
    assert r.json()["prompt"].strip() == text
    ours = httpx.post(stack.api + "/tokenize", json={"model": "smol", "prompt": text}).json()
    r = httpx.post(relay.remote + "/count_token", json={"prompt": text}, timeout=30)
    assert r.json() == {"count": ours["count"], "error_code": 0}
    r = httpx.post(relay.api + "/tokenize", json={"model": "relay-smol", "prompt": text})
    assert r.json()["tokens"] == ours["tokens"]
    r = httpx.post(relay.api + "/detokenize", json={"model": "relay-smol",
                                                    "tokens": ours["tokens"]})
    assert r.json()["prompt"] == text
    messages = [{"role": "user", "content": "Hi"}]
    used = relay.client().chat.completions.create(model="managed-smol", messages=messages,
                                                  max_tokens=1, temperature=0)
    r = httpx.post(relay.managed + "/count_token", json={"prompt": messages}, timeout=30)
    assert r.json() == {"count": used.usage.prompt_tokens, "error_code": 0}
    r = httpx.post(relay.api + "/tokenize", json={"model": "managed-smol",
                                                  "messages": messages})
    assert r.status_code == 400 and "renders them" in r.json()["error"]["message"]


def test_upstream_errors_keep_their_meaning(relay: Relay) -> None:
    client = relay.client()
    # llama.cpp's server ends a stream silently on this; the worker asks again to learn why.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="managed-smol", max_tokens=8,
                                       messages=[{"role": "user", "content": LONG_PROMPT}])
    assert e.value.code == "context_length_exceeded"
    assert "1024" in e.value.message
    # The upstream (another llmrelay) does not know the model it is asked for: 404.
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="relay-missing", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in nf.value.message


def test_error_mapping_round_trip() -> None:
    """Each upstream status becomes the FastChat code our API server maps back to it."""
    cases = [
        (400, '{"error": {"message": "bad top_p", "code": null}}', 400, "bad top_p"),
        (422, '{"detail": "field required"}', 400, "field required"),
        (400, '{"error": {"message": "too long", "code": "context_length_exceeded"}}', 400,
         "too long"),
        (404, '{"error": {"message": "The model x does not exist", "code": "model_not_found"}}',
         404, "does not exist"),
        (404, '{"detail": "Not Found"}', 400, "does not serve"),
        (429, '{"error": {"message": "slow down"}}', 429, "slow down"),
        (500, "Internal Server Error", 500, "Internal Server Error"),
        (503, "", 500, "503"),
        (401, '{"error": {"message": "bad key"}}', 500, "--upstream-key"),
    ]
    for status_code, body, want, words in cases:
        err = map_error(status_code, body)
        api = from_worker(err.code, str(err))
        assert api.status == want, (status_code, body, api.status)
        assert words in api.message, (status_code, api.message)
    assert map_error(400, '{"error": {"code": "context_length_exceeded", "message": "m"}}'
                     ).code == 40303
    assert map_error(429, "").code == 42903  # the API server tries another worker first


def test_call_arguments_for_the_sdk() -> None:
    """OpenAI's parameters are the SDK's arguments; the others go in extra_body, only when set."""
    req = GenerationRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.5,
                            max_new_tokens=7, stop=["x"], seed=3, logprobs=2, top_k=40,
                            repetition_penalty=1.1, stop_token_ids=[5])
    call = Call.of(req, "m")
    assert call.chat and call.extra_body == {"top_k": 40, "repetition_penalty": 1.1,
                                             "stop_token_ids": [5]}
    assert call.args == {"model": "m", "temperature": 0.5, "top_p": 1.0, "max_tokens": 7,
                         "stop": ["x"], "seed": 3, "messages": req.messages, "logprobs": True,
                         "top_logprobs": 2}
    streamed = call.streamed()
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    assert "stream" not in call.whole() and call.whole(max_tokens=1)["max_tokens"] == 1
    plain = Call.of(GenerationRequest(prompt_token_ids=[1, 2], max_new_tokens=None, echo=True,
                                      logprobs=0), "m")
    assert not plain.chat and plain.extra_body == {} and "extra_body" not in plain.streamed()
    assert plain.args == {"model": "m", "temperature": 1.0, "top_p": 1.0, "prompt": [1, 2],
                          "echo": True, "logprobs": 0}
    # Tokenize endpoints: at the server's root; vLLM says `count`, the others list `tokens`.
    assert server_root("http://h:1/v1/") == "http://h:1" and server_root("http://h:1") == "http://h:1"
    assert count_of({"count": 4, "tokens": [1]}) == 4 and count_of({"tokens": [1, 2]}) == 2
    with pytest.raises(ValueError):
        count_of({"detail": "Not Found"})


def test_embeddings_pass_through(relay: Relay) -> None:
    base = upstream_of(relay.managed)["base_url"]
    direct = httpx.post(base + "/embeddings", json={"input": ["hello", "world wide web"]},
                        timeout=60).json()
    r = relay.client().embeddings.create(model="managed-smol", input=["hello", "world wide web"])
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 576  # SmolLM2's hidden size
    for ours, theirs in zip(r.data, direct["data"], strict=True):
        assert ours.embedding == pytest.approx(theirs["embedding"], rel=1e-5, abs=1e-6)
    assert r.usage.prompt_tokens == direct["usage"]["prompt_tokens"] > 0


# -- another llmrelay stack as a remote upstream -----------------------------------------------

def test_relay_to_another_llmrelay_stack(relay: Relay, stack: Stack) -> None:
    msgs = [{"role": "user", "content": "Name three colours."}]
    direct = stack.client().chat.completions.create(model="smol", messages=msgs, max_tokens=16,
                                                    temperature=0)
    via = relay.client().chat.completions.create(model="relay-smol", messages=msgs,
                                                 max_tokens=16, temperature=0)
    assert via.choices[0].message.content == direct.choices[0].message.content
    counted(via.usage, direct.usage.model_dump())  # llmrelay streams usage
    text, usage = last_usage(relay.client().chat.completions.create(
        model="relay-smol", messages=msgs, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert text == direct.choices[0].message.content
    counted(usage, direct.usage.model_dump())
    # Completions with token ids pass through too.
    c = relay.client().completions.create(model="relay-smol", prompt=[504, 3458, 314],
                                          max_tokens=4, temperature=0)
    d = stack.client().completions.create(model="smol", prompt=[504, 3458, 314], max_tokens=4,
                                          temperature=0)
    assert c.choices[0].text == d.choices[0].text
    counted(c.usage, d.usage.model_dump())
    text, usage = last_usage(relay.client().completions.create(
        model="relay-smol", prompt=[504, 3458, 314], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert text == d.choices[0].text
    counted(usage, d.usage.model_dump())


DISCONNECTED = "Disconnected from client (via refresh/close)"  # llama.cpp's server says so


def test_client_disconnect_closes_the_upstream_request(relay: Relay) -> None:
    before = relay.managed_proc.log().count(DISCONNECTED)
    with httpx.stream("POST", relay.api + "/v1/completions", timeout=60, json={
            "model": "managed-smol", "prompt": "Count from 1 to 1000: 1, 2, 3,",
            "max_tokens": 900, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 3:
                break  # leave mid-generation
    # The API server closes the worker stream, the worker sets the request's cancel flag, the
    # engine closes its upstream stream: llama.cpp's server (whose output is in the worker's
    # log) reports the disconnect and stops generating.
    wait_for(lambda: relay.managed_proc.log().count(DISCONNECTED) > before, 60,
             "llama.cpp's server to see the disconnect")
    wait_for(lambda: status(relay.managed)["llmrelay"]["running"] == 0, 10,
             "the worker to be idle")


# -- upstream down, then back --------------------------------------------------------------------

def test_upstream_down_then_back(relay: Relay, tmp_path: Path) -> None:
    port = free_port()
    server = llama_server(port, tmp_path / "llama-server.log")
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200, 60,
                 "llama.cpp's server")
        _, worker = relay.procs.worker(relay.controller, "flaky", extra=(
            "--upstream", f"http://127.0.0.1:{port}/v1", "--upstream-check-interval", "0.3"))
        wait_for(lambda: "flaky" in api_models(relay.api), 30, "flaky in the API")
        client = relay.client()
        msgs = [{"role": "user", "content": "hi"}]
        # Usage counted through a running llama.cpp server (issue 17's reproduction), chat and
        # text prompts, streamed and not.
        base = f"http://127.0.0.1:{port}/v1"
        want = direct_usage(base, "/chat/completions", {
            "messages": msgs, "max_tokens": 3, "temperature": 0})
        counted(client.chat.completions.create(model="flaky", messages=msgs, max_tokens=3,
                                               temperature=0).usage, want)
        counted(last_usage(client.chat.completions.create(
            model="flaky", messages=msgs, max_tokens=3, temperature=0, stream=True,
            stream_options={"include_usage": True}))[1], want)
        want = direct_usage(base, "/completions", {"prompt": "The sky is", "max_tokens": 3,
                                                   "temperature": 0})
        counted(client.completions.create(model="flaky", prompt="The sky is", max_tokens=3,
                                          temperature=0).usage, want)
        counted(last_usage(client.completions.create(
            model="flaky", prompt="The sky is", max_tokens=3, temperature=0, stream=True,
            stream_options={"include_usage": True}))[1], want)

        server.send_signal(signal.SIGKILL)
        server.wait()
        wait_for(lambda: status(worker)["llmrelay"]["ready"] is False, 15, "ready=false")
        assert upstream_of(worker)["healthy"] is False
        # The API server sees it in the table and routes nothing there: a 503 that says so.
        wait_for(lambda: httpx.post(relay.api + "/v1/chat/completions", json={
            "model": "flaky", "messages": msgs, "max_tokens": 3}).status_code == 503, 15,
            "the API server to stop routing to the worker")
        assert "flaky" in api_models(relay.api)  # the model still exists: only unavailable
        # Asked directly, the worker refuses at once with a server-side code (fail over).
        raw = httpx.post(worker + "/worker_generate", json={"prompt": "hi", "max_new_tokens": 2})
        assert raw.json()["error_code"] == 50001 and "not available" in raw.json()["text"]

        server = llama_server(port, tmp_path / "llama-server.log")
        wait_for(lambda: status(worker)["llmrelay"]["ready"] is True, 60, "ready again")
        wait_for(lambda: httpx.post(relay.api + "/v1/chat/completions", json={
            "model": "flaky", "messages": msgs, "max_tokens": 3}).status_code == 200, 15,
            "requests served again")
    finally:
        server.kill()
        server.wait()


# -- managed mode: crash, restart, shutdown, refused start ------------------------------------

def test_managed_server_restarts_after_a_crash_and_stops_with_the_worker(procs: Procs) -> None:
    proc, worker = procs.worker("http://127.0.0.1:9", "crashy", extra=(
        "--no-register", "--managed", "llama-cpp-server", "--upstream-check-interval", "0.3"))
    first = upstream_of(worker)["managed"]
    assert first["restarts"] == 0 and pid_alive(first["pid"])
    os.kill(first["pid"], signal.SIGKILL)  # a real crash
    wait_for(lambda: status(worker)["llmrelay"]["ready"] is False, 15, "ready=false after crash")
    wait_for(lambda: upstream_of(worker)["managed"]["restarts"] == 1
             and upstream_of(worker)["healthy"], 60, "the server restarted and ready")
    second = upstream_of(worker)["managed"]
    assert second["pid"] != first["pid"] and second["last_exit_code"] == -signal.SIGKILL
    r = httpx.post(worker + "/worker_generate", timeout=60, json={
        "prompt": "Hello", "max_new_tokens": 3, "echo": False})
    assert r.json()["error_code"] == 0 and r.json()["usage"]["completion_tokens"] == 3
    counted(r.json()["usage"])
    proc.stop()  # SIGTERM: the child goes with the worker (PR_SET_PDEATHSIG, managed.py)
    wait_for(lambda: not pid_alive(second["pid"]), 10, "the managed server to be stopped")


def test_managed_server_that_cannot_start_is_a_clear_error(procs: Procs) -> None:
    proc, _ = procs.worker("http://127.0.0.1:9", "broken", wait=False, extra=(
        "--no-register", "--managed", "llama-cpp-server", "--managed-args", "--n_ctx many"))
    assert proc.proc is not None
    assert proc.proc.wait(60) == 2
    assert "llama-cpp-server exited with code" in proc.log()
    assert "before it was ready" in proc.log()


# -- vLLM: flag mapping (vLLM cannot be installed here) ----------------------------------------

SEED_FLAGS = ["--host", "0.0.0.0", "--port", "21002",
              "--worker-address", "http://localhost:21002",
              "--controller-address", "http://localhost:21001",
              "--model-path", "/models/Qwen2.5-7B-Instruct", "--model-names", "qwen2.5-7b",
              "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.85"]


def test_vllm_flag_mapping_of_the_seed_command() -> None:
    args = vllm_worker.parse(SEED_FLAGS + ["--max-model-len", "8192", "--enforce-eager"])
    assert args.managed == "vllm" and args.engine == "openai"
    assert args.limit_worker_concurrency == 1024  # FastChat's vllm_worker default
    opts = mg.options_from_args(args, args.model_path, ["qwen2.5-7b"], 40123)
    assert mg.vllm_argv(opts) == [
        "vllm", "serve", "/models/Qwen2.5-7B-Instruct", "--host", "127.0.0.1",
        "--port", "40123", "--served-model-name", "qwen2.5-7b",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.85",
        "--max-num-seqs", "1024", "--max-model-len", "8192", "--enforce-eager"]


def test_vllm_flag_mapping_of_worker_flags() -> None:
    p = argparse.ArgumentParser()
    add_worker_args(p)
    args = p.parse_args(["--managed", "vllm", "--num-gpus", "2", "--context-length", "4096",
                         "--dtype", "bfloat16", "--seed", "7", "--model-names", "a,b"])
    argv = mg.vllm_argv(mg.options_from_args(args, "/m", ["a", "b"], 1))
    assert argv[argv.index("--served-model-name") + 1:][:2] == ["a", "b"]
    for flag, value in [("--tensor-parallel-size", "2"), ("--max-model-len", "4096"),
                        ("--dtype", "bfloat16"), ("--seed", "7"), ("--max-num-seqs", "5")]:
        assert argv[argv.index(flag) + 1] == value
    assert "--gpu-memory-utilization" not in argv  # vLLM's own default applies
    # The same flags for llama.cpp's server.
    cpp = mg.llamacpp_server_argv(mg.options_from_args(args, "/m.gguf", ["a", "b"], 1))
    assert cpp[cpp.index("--model_alias") + 1] == "a"
    assert cpp[cpp.index("--n_ctx") + 1] == "4096" and "--n_gpu_layers" in cpp


def test_vllm_worker_without_vllm_says_how_to_install_it() -> None:
    r = subprocess.run([sys.executable, "-m", "llmrelay.serve.vllm_worker", *SEED_FLAGS],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "pip install 'llmrelay[vllm]'" in r.stderr


# -- one stack file, four kinds of worker ------------------------------------------------------

def test_mixed_stack_from_one_file(stack: Stack, tmp_path: Path) -> None:
    api_port, c_port = free_port(), free_port()
    ports = [free_port() for _ in range(4)]
    (tmp_path / "stack.toml").write_text(f"""
registration_token = "mixed-stack-secret"

[controller]
port = {c_port}
heartbeat_interval = 1

[api]
port = {api_port}

[[worker]]
model_path = "smollm2"
model_names = ["local-smol"]
port = {ports[0]}
context_length = 1024

[[worker]]
managed = "llama-cpp-server"
model_path = "smollm2"
model_names = ["managed-smol"]
port = {ports[1]}
context_length = 1024

[[worker]]
upstream = "{stack.api}/v1"
upstream_model = "gemma"
model_names = ["remote-gemma"]
port = {ports[2]}

[[worker]]
model_path = "all-minilm-l6-v2"
port = {ports[3]}
""")
    up = subprocess.Popen([sys.executable, "-m", "llmrelay.cli", "up", str(tmp_path / "stack.toml")],
                          stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    api = f"http://127.0.0.1:{api_port}"
    try:
        want = {"local-smol", "managed-smol", "remote-gemma", "all-minilm-l6-v2"}
        wait_for(lambda: "llmrelay is up" in (tmp_path / "up.log").read_text(), 240,
                 "llmrelay up")
        assert api_models(api) == want
        client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=120)
        for model in ("local-smol", "managed-smol", "remote-gemma"):
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
            assert r.choices[0].message.content, model
            counted(r.usage)
        e = client.embeddings.create(model="all-minilm-l6-v2", input="hello")
        assert len(e.data[0].embedding) == 384
        auth = auth_headers("mixed-stack-secret")
        statuses = [httpx.post(f"http://127.0.0.1:{p}/worker_get_status", headers=auth).json()
                    ["llmrelay"] for p in ports]
        assert [s["engine"] for s in statuses] == ["llamacpp", "openai", "openai", "transformers"]
        assert statuses[2]["upstream"]["base_url"] == stack.api + "/v1"
        managed_pid = statuses[1]["upstream"]["managed"]["pid"]
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert "llmrelay stopped." in (tmp_path / "up.log").read_text()
    wait_for(lambda: not pid_alive(managed_pid), 10, "the managed server to stop with the stack")
