"""No usage lost on a crash: a request's usage is committed to the API server's SQLite database
before the answer's last bytes leave, so killing the server (SIGKILL) right after the answers
loses none of it, and the daily token limits rebuilt from the store at restart hand out no
free tokens. Through a real API server with a keys file, in front of the session's workers,
with every front door (chat, completions, Messages, Responses), streamed and whole."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import openai

from conftest import Procs, Stack, free_port, wait_for
from llmrelay.api.keys import add_key

Q = [{"role": "user", "content": "Say hi."}]
Used = tuple[str, int, int]  # (model, prompt tokens, completion tokens) as the answer said


def chat(c: openai.OpenAI, model: str) -> Used:
    u = c.chat.completions.create(model=model, messages=Q, max_tokens=3).usage
    assert u is not None
    return model, u.prompt_tokens, u.completion_tokens


def chat_stream(c: openai.OpenAI, model: str) -> Used:
    usage = None
    for chunk in c.chat.completions.create(model=model, messages=Q, max_tokens=4, stream=True,
                                           stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    assert usage is not None
    return model, usage.prompt_tokens, usage.completion_tokens


def completion(c: openai.OpenAI, model: str) -> Used:
    u = c.completions.create(model=model, prompt="Once upon", max_tokens=3).usage
    assert u is not None
    return model, u.prompt_tokens, u.completion_tokens


def completion_stream(c: openai.OpenAI, model: str) -> Used:
    usage = None
    for chunk in c.completions.create(model=model, prompt="Once upon", max_tokens=4,
                                      stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    assert usage is not None
    return model, usage.prompt_tokens, usage.completion_tokens


def response(c: openai.OpenAI, model: str) -> Used:
    u = c.responses.create(model=model, input="Say hi.", max_output_tokens=3, store=False).usage
    assert u is not None
    return model, u.input_tokens, u.output_tokens


def response_stream(c: openai.OpenAI, model: str) -> Used:
    final = None
    for e in c.responses.create(model=model, input="Say hi.", max_output_tokens=4, store=False,
                                stream=True):
        if e.type in ("response.completed", "response.incomplete"):
            final = e.response
    assert final is not None and final.usage is not None
    return model, final.usage.input_tokens, final.usage.output_tokens


def message(a: anthropic.Anthropic, model: str) -> Used:
    m = a.messages.create(model=model, max_tokens=3, messages=Q)  # type: ignore[arg-type]
    return model, m.usage.input_tokens, m.usage.output_tokens


def message_stream(a: anthropic.Anthropic, model: str) -> Used:
    with a.messages.stream(model=model, max_tokens=4, messages=Q) as s:  # type: ignore[arg-type]
        m = s.get_final_message()
    return model, m.usage.input_tokens, m.usage.output_tokens


OPENAI: list[Callable[[openai.OpenAI, str], Used]] = [
    chat, chat_stream, completion, completion_stream, response, response_stream]
ANTHROPIC: list[Callable[[anthropic.Anthropic, str], Used]] = [message, message_stream]


def test_usage_of_answered_requests_survives_a_kill_right_after(stack: Stack, procs: Procs,
                                                                tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    admin = add_key(keys_file, "ops", admin=True)
    secrets = {name: add_key(keys_file, name) for name in ("alice", "bob")}
    data, port = tmp_path / "data", free_port()
    flags = ("--api-keys-file", str(keys_file), "--data-dir", str(data))
    server, api = procs.api(stack.controller, port=port, extra=flags)
    ops = {"Authorization": f"Bearer {admin}"}
    wait_for(lambda: {"smol", "gemma"} <= set(httpx.get(api + "/health", headers=ops)
                                              .json()["models"]), 30, "the models")

    def one(i: int) -> tuple[str, Used]:
        name = ("alice", "bob")[i % 2]
        model = "gemma" if i % 5 == 4 else "smol"
        kinds = len(OPENAI) + len(ANTHROPIC)
        kind = (i // 2) % kinds  # every kind, for both keys, streamed and not
        if kind < len(OPENAI):
            c = openai.OpenAI(base_url=api + "/v1", api_key=secrets[name], max_retries=0,
                              timeout=120)
            return name, OPENAI[kind](c, model)
        a = anthropic.Anthropic(base_url=api, api_key=secrets[name], max_retries=0, timeout=120)
        return name, ANTHROPIC[kind - len(OPENAI)](a, model)

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, range(20)))
    server.kill()  # SIGKILL, right after the 20th answer: nothing gets to write at exit

    want: dict[tuple[str, str], list[int]] = {}
    for name, (model, prompt, completion_tokens) in answers:
        row = want.setdefault((name, model), [0, 0, 0])
        row[0] += 1
        row[1] += prompt
        row[2] += completion_tokens

    _, api = procs.api(stack.controller, port=port, extra=flags)
    r = httpx.get(api + "/v1/usage", headers=ops)
    r.raise_for_status()
    got = {(x["key"], x["model"]): [x["requests"], x["prompt_tokens"], x["completion_tokens"]]
           for x in r.json()["data"]}
    assert sum(row[0] for row in got.values()) == 20
    assert got == want
    out = subprocess.run([sys.executable, "-m", "llmrelay.cli", "usage", "--base-url",
                          api + "/v1", "--api-key", admin], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    total = out.splitlines()[-1].split()
    assert total[:2] == ["total", "20"]
    assert total[2:4] == [str(sum(r[1] for r in want.values())),
                          str(sum(r[2] for r in want.values()))]
