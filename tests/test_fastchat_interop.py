"""Interoperability with the real FastChat 0.2.36, both ways, on CPU with SmolLM2.

- A FastChat `model_worker` registers with our controller (its own registration and 45 s
  heartbeats) and is served by our API server: chat and completions, stream and not, with the
  prompt rendered from the worker's conversation template.
- One of our workers and that FastChat worker serve the same model name and share the load.
- FastChat's own `openai_api_server` uses our controller and our workers.

FastChat runs from its own cached virtual environment (fastchat_env.py); these tests are
skipped, with the reason, only where that environment cannot be built.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from fastchat_env import require_fastchat, require_smollm2_hf

from conftest import Proc, Procs, Stack, free_port, registered, wait_for
from llmrelay.fastchat_conv import Conversation

FC_ONLY = "fc-only"  # served by the FastChat worker alone
SHARED = "smol-hf"  # served by the FastChat worker and one of ours


class FastChatProc(Proc):
    """A FastChat process run from the FastChat virtual environment."""

    def __init__(self, name: str, python: Path, module: str, argv: list[str], log_dir: Path) -> None:
        super().__init__(name, argv, log_dir)
        self.python = python
        self.module = module

    def start(self) -> FastChatProc:
        log = open(self.log_path, "ab")
        fc_logs = self.log_path.parent / f"{self.name}-logdir"
        fc_logs.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [str(self.python), "-m", self.module, *self.argv],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=fc_logs,
            env=dict(os.environ, PYTHONUNBUFFERED="1", LOGDIR=str(fc_logs), OMP_NUM_THREADS="1",
                     CUDA_VISIBLE_DEVICES=""),
        )
        log.close()
        return self


def start_fastchat(procs: Procs, python: Path, module: str, argv: list[str]) -> FastChatProc:
    p = FastChatProc(f"fastchat-{module.rsplit('.', 1)[-1]}-{len(procs.all)}", python,
                     f"fastchat.serve.{module}", argv, procs.log_dir)
    p.start()
    procs.all.append(p)
    return p


@dataclass
class Interop:
    controller: str
    api: str
    fc_worker: str
    our_worker: str
    fc_proc: FastChatProc
    python: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def interop(logs_dir: Path) -> Iterator[Interop]:
    python = require_fastchat()
    model = require_smollm2_hf()
    procs = Procs(logs_dir)
    try:
        _, controller = procs.controller()
        port = free_port()
        fc_url = f"http://127.0.0.1:{port}"
        fc = start_fastchat(procs, python, "model_worker", [
            "--host", "127.0.0.1", "--port", str(port), "--worker-address", fc_url,
            "--controller-address", controller, "--model-path", str(model),
            "--model-names", f"{FC_ONLY},{SHARED}", "--device", "cpu"])
        _, ours = procs.worker(controller, SHARED)
        _, api = procs.api(controller)
        wait_for(lambda: registered(controller, fc_url), 240, "the FastChat worker to register")
        wait_for(lambda: {FC_ONLY, SHARED} <= {
            m["id"] for m in httpx.get(api + "/v1/models").json()["data"]}, 30, "models")
        yield Interop(controller, api, fc_url, ours, fc, python)
    finally:
        procs.stop_all()


def fastchat_prompt(interop: Interop, messages: list[dict]) -> str:
    """The prompt FastChat's own code builds for these messages with the worker's template."""
    conv = httpx.post(interop.fc_worker + "/worker_get_conv_template", json={}).json()["conv"]
    script = (
        "import json, sys\n"
        "from fastchat.conversation import Conversation, SeparatorStyle\n"
        "conv, messages = json.loads(sys.stdin.read())\n"
        "c = Conversation(name=conv['name'], system_template=conv['system_template'], "
        "system_message=conv['system_message'], roles=conv['roles'], "
        "messages=list(conv['messages']), offset=conv['offset'], "
        "sep_style=SeparatorStyle(conv['sep_style']), sep=conv['sep'], sep2=conv['sep2'], "
        "stop_str=conv['stop_str'], stop_token_ids=conv['stop_token_ids'])\n"
        "for m in messages:\n"
        "    if m['role'] == 'system': c.set_system_message(m['content'])\n"
        "    else: c.append_message(c.roles[0 if m['role'] == 'user' else 1], m['content'])\n"
        "c.append_message(c.roles[1], None)\n"
        "print(json.dumps(c.get_prompt()))\n"
    )
    out = subprocess.run([str(interop.python), "-c", script], input=json.dumps([conv, messages]),
                         capture_output=True, text=True, check=True, cwd=interop.fc_proc.log_path.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def count_on(worker: str, prompt: str) -> int:
    return httpx.post(worker + "/count_token", json={"prompt": prompt}).json()["count"]


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."}]


def test_fastchat_worker_is_registered_as_a_fastchat_worker(interop: Interop) -> None:
    table = httpx.get(interop.controller + "/worker_table").json()
    entry = next(w for w in table["workers"] if w["name"] == interop.fc_worker)
    assert "llmrelay" not in entry["status"]  # no extensions: spoken to in FastChat's protocol
    assert sorted(entry["model_names"]) == sorted([FC_ONLY, SHARED])


def test_chat_non_stream_through_fastchat_worker(interop: Interop) -> None:
    r = interop.client().chat.completions.create(model=FC_ONLY, messages=MESSAGES, max_tokens=12,
                                                 temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    # The prompt was rendered exactly as FastChat renders it for this worker's template.
    expected = count_on(interop.fc_worker, fastchat_prompt(interop, MESSAGES))
    assert r.usage.prompt_tokens == expected
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_through_fastchat_worker_sends_deltas(interop: Interop) -> None:
    client = interop.client()
    stream = client.chat.completions.create(
        model=FC_ONLY, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    text = "".join(pieces)
    whole = client.chat.completions.create(model=FC_ONLY, messages=MESSAGES, max_tokens=16,
                                           temperature=0)
    # Deltas, not FastChat's cumulative text: joined, they are the non-stream answer.
    assert text == whole.choices[0].message.content
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completions_through_fastchat_worker(interop: Interop) -> None:
    client = interop.client()
    r = client.completions.create(model=FC_ONLY, prompt="The capital of France is", max_tokens=8,
                                  temperature=0)
    assert r.choices[0].text
    assert r.usage.prompt_tokens == count_on(interop.fc_worker, "The capital of France is")
    pieces = [c.choices[0].text for c in client.completions.create(
        model=FC_ONLY, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == r.choices[0].text
    # FastChat's cumulative logprobs, turned into OpenAI's legacy shape
    lp = client.completions.create(model=FC_ONLY, prompt="The capital of France is",
                                   max_tokens=8, temperature=0, logprobs=1).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 8
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_stop_strings_reach_the_fastchat_worker(interop: Interop) -> None:
    client = interop.client()
    full = client.completions.create(model=FC_ONLY, prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0).choices[0].text
    assert "," in full.strip()
    cut = client.completions.create(model=FC_ONLY, prompt="1, 2, 3, 4,", max_tokens=12,
                                    temperature=0, stop=[","])
    assert "," not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text)


def test_too_long_prompt_is_a_clear_error(interop: Interop) -> None:
    context = httpx.post(interop.fc_worker + "/model_details", json={}).json()["context_length"]
    with pytest.raises(openai.BadRequestError) as e:
        interop.client().chat.completions.create(
            model=FC_ONLY, messages=[{"role": "user", "content": "word " * (context + 50)}],
            max_tokens=4)
    assert e.value.code == "context_length_exceeded"


def test_token_id_prompts_are_refused_for_fastchat_only_model(interop: Interop) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        interop.client().completions.create(model=FC_ONLY, prompt=[1, 2, 3], max_tokens=2)
    assert "token ids" in e.value.message


def test_tools_and_formats_are_refused_for_a_fastchat_only_model(interop: Interop) -> None:
    """A FastChat worker cannot constrain generation: a clear 400 naming the parameter, the
    model and why, never a silently unconstrained answer."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for kwargs, param in (({"tools": [tool], "tool_choice": "required"}, "tools"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"logit_bias": {"5": 10}}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as e:
            interop.client().chat.completions.create(model=FC_ONLY, messages=MESSAGES,
                                                     max_tokens=4, **kwargs)
        assert e.value.body["param"] == param
        assert FC_ONLY in e.value.message and "FastChat" in e.value.message
    # the model shared with one of our workers is served there, constrained
    r = interop.client().chat.completions.create(model=SHARED, messages=MESSAGES, max_tokens=120,
                                                 temperature=0,
                                                 response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_fastchat_worker_outlives_our_heartbeat_expiry(interop: Interop) -> None:
    """FastChat heartbeats every 45 s; our controller (1 s beats here) must not drop it."""

    def silent_for() -> float:
        table = httpx.get(interop.controller + "/worker_table").json()
        entry = next(w for w in table["workers"] if w["name"] == interop.fc_worker)
        return table["now"] - entry["last_heart_beat"] - table["expiration"]

    wait_for(lambda: silent_for() > 1.5, 30, "the FastChat worker to be silent past our expiry")
    assert registered(interop.controller, interop.fc_worker)


def _served(worker: str) -> int:
    return httpx.post(worker + "/worker_get_status").json()["llmrelay"]["served"]


def test_mixed_workers_share_the_load(interop: Interop) -> None:
    """shortest_queue: concurrent requests spread over our worker and the FastChat worker."""
    def idle() -> bool:  # an earlier test's request still counted on one of them tips the split
        rows = httpx.get(interop.controller + "/worker_table").json()["workers"]
        return all(int(w.get("queue_length", 0)) == 0 for w in rows
                   if SHARED in w.get("model_names", []))

    wait_for(idle, 60, "both workers of the shared model to report an empty queue")
    time.sleep(1.5)  # the API server copies the controller's table every 0.5 s
    before = _served(interop.our_worker)
    client = interop.client()
    results: list[str] = []
    errors: list[BaseException] = []

    barrier = threading.Barrier(4)

    def one() -> None:
        barrier.wait()  # all four open at once
        try:
            r = client.chat.completions.create(
                model=SHARED, messages=[{"role": "user", "content": "Count to twenty."}],
                max_tokens=48, temperature=0)
            results.append(r.choices[0].message.content or "")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 and all(results)
    ours = _served(interop.our_worker) - before
    # Four requests opened at once over two idle workers: two each (the FastChat worker's
    # queue is known to the API server by its own requests in flight).
    assert ours == 2, f"our worker served {ours} of 4"


@pytest.fixture(scope="module")
def fastchat_api(stack: Stack, logs_dir: Path) -> Iterator[str]:
    """FastChat's own openai_api_server, on our controller and our workers (the session stack)."""
    python = require_fastchat()
    procs = Procs(logs_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        start_fastchat(procs, python, "openai_api_server", [
            "--host", "127.0.0.1", "--port", str(port), "--controller-address", stack.controller])
        wait_for(lambda: httpx.get(url + "/v1/models").status_code == 200, 120,
                 "FastChat's API server")
        yield url
    finally:
        procs.stop_all()


def test_fastchat_api_server_lists_our_models(fastchat_api: str) -> None:
    ids = {m["id"] for m in httpx.get(fastchat_api + "/v1/models").json()["data"]}
    assert {"smol", "gemma"} <= ids


def test_our_conv_template_is_smollm2s_real_template(stack: Stack) -> None:
    conv = httpx.post(stack.smol_workers[0] + "/worker_get_conv_template", json={}).json()["conv"]
    assert conv["sep_style"] == 9  # CHATML in FastChat 0.2.36
    assert conv["llmrelay_exact"] is True
    assert "SmolLM" in conv["system_message"]  # the template's default system prompt
    msgs = [{"role": "user", "content": "Hi"}]
    rendered = Conversation.from_wire(conv).render(msgs)
    # Our worker's own rendering of the same messages (through /count_token on messages).
    assert count_on(stack.smol_workers[0], rendered) == httpx.post(
        stack.smol_workers[0] + "/count_token", json={"prompt": msgs}).json()["count"]


@pytest.mark.parametrize("stream", [False, True])
def test_fastchat_api_server_chat_on_our_workers(fastchat_api: str, stack: Stack,
                                                stream: bool) -> None:
    client = openai.OpenAI(base_url=fastchat_api + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = dict(model="smol", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
              temperature=0)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)
    else:
        r = client.chat.completions.create(**kw)
        text = r.choices[0].message.content
        # FastChat rendered the prompt with the conversation our worker described: exactly the
        # model's own template (ChatML with its default system prompt), token for token.
        assert r.usage.prompt_tokens == httpx.post(stack.smol_workers[0] + "/count_token", json={
            "prompt": kw["messages"]}).json()["count"]
    assert text and "<|im_end|>" not in text and "<|im_start|>" not in text


@pytest.mark.parametrize("stream", [False, True])
def test_fastchat_api_server_completions_on_our_workers(fastchat_api: str, stream: bool) -> None:
    client = openai.OpenAI(base_url=fastchat_api + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = dict(model="smol", prompt="Once upon a time", max_tokens=8, temperature=0)
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)
                       if c.choices)
    else:
        text = client.completions.create(**kw).choices[0].text
    assert text and not text.startswith("Once upon a time")  # echo off, as FastChat asks


def test_our_worker_answers_fastchat_cumulative_stream(stack: Stack) -> None:
    """What FastChat's API server sends: a prompt, echo false, cumulative text frames."""
    with httpx.stream("POST", stack.smol_workers[0] + "/worker_generate_stream", json={
            "model": "smol", "prompt": "One, two,", "temperature": 0, "max_new_tokens": 8,
            "echo": False, "stop": None, "stop_token_ids": None}) as r:
        frames = [json.loads(p) for p in r.read().split(b"\0") if p.strip()]
    texts = [f["text"] for f in frames]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert frames[-1]["finish_reason"] in ("stop", "length")


def test_inexpressible_template_is_described_honestly(stack: Stack) -> None:
    """Gemma folds the system message into the first user turn: no FastChat conversation can."""
    conv = httpx.post(stack.gemma_worker + "/worker_get_conv_template", json={}).json()["conv"]
    assert conv["llmrelay_exact"] is False
    # Still the closest usable description: the user turn renders as the model's template does.
    rendered = Conversation.from_wire(conv).render([{"role": "user", "content": "Hi"}])
    assert "<start_of_turn>user\nHi<end_of_turn>" in rendered
    log = next(p for p in stack.procs.all if p.name.startswith("worker-gemma")).log()
    assert "cannot be expressed exactly as a FastChat conversation" in log


def test_fastchat_worker_dying_mid_stream_ends_in_a_clean_error(interop: Interop) -> None:
    """A FastChat worker cannot resume another's generation (no `continuation`): when it dies
    mid-answer the stream ends in an error event, as before mid-stream failover, never a hang or
    a cut without a word. Last in this module: it kills the module's FastChat worker."""
    client = interop.client()
    got: list[str] = []
    stream = client.chat.completions.create(
        model=FC_ONLY, temperature=0, max_tokens=400, stream=True,
        messages=[{"role": "user", "content": "Count from 1 to 300, comma separated."}])
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
                if len(got) == 3:  # mid-answer: kill -9 the worker
                    os.killpg(interop.fc_proc.proc.pid, signal.SIGKILL)
    assert len(got) >= 3
    assert "worker" in str(e.value.message).lower()
