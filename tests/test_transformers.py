"""The transformers engine, end to end: real worker processes on real models, CPU.

SmolLM2 is turned into an HF folder once per session (the bundled GGUF loaded and dequantized by
transformers, its GGUF quantizer marker cleared, saved with save_pretrained); the embedding
worker serves the bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

import structured_cases
from conftest import Procs, Stack, api_models, registered, wait_for

pytest.importorskip("torch")
pytest.importorskip("transformers")

TRANSFORMERS = ("--engine", "transformers")


class HF:
    def __init__(self, api: str, controller: str, procs: Procs, workers: dict[str, str]) -> None:
        self.api, self.controller, self.procs = api, controller, procs
        self.workers = workers  # model name -> worker address

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf(smol_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HF]:
    procs = Procs(tmp_path_factory.mktemp("hf-logs"))
    try:
        _, controller = procs.controller()
        _, chat = procs.worker(controller, "smolhf", str(smol_hf), wait=False,
                               extra=(*TRANSFORMERS, "--limit-worker-concurrency", "8"))
        _, emb = procs.worker(controller, "minilm", "all-minilm-l6-v2", wait=False)
        for url in (chat, emb):
            wait_for(lambda url=url: registered(controller, url), 240, f"worker {url}")
        _, api = procs.api(controller)
        wait_for(lambda: api_models(api) >= {"smolhf", "minilm"}, 30, "models in the API")
        yield HF(api, controller, procs, {"smolhf": chat, "minilm": emb})
    finally:
        procs.stop_all()


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_and_completions(hf: HF) -> None:
    c = hf.client()
    r = c.chat.completions.create(model="smolhf", messages=QUESTION, max_tokens=30, temperature=0)
    text = r.choices[0].message.content or ""
    assert "Paris" in text
    assert r.usage is not None and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    stream = c.chat.completions.create(model="smolhf", messages=QUESTION, max_tokens=30,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text  # greedy: the same text streamed or not
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    r2 = c.completions.create(model="smolhf", prompt="The capital of France is", max_tokens=8,
                              temperature=0)
    assert r2.choices[0].finish_reason == "length"
    assert r2.usage is not None and r2.usage.completion_tokens == 8
    parts = list(c.completions.create(model="smolhf", prompt="The capital of France is",
                                      max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r2.choices[0].text
    stopped = c.completions.create(model="smolhf", prompt="Count: 1, 2, 3, 4,", max_tokens=30,
                                   temperature=0, stop=["7"])
    assert "7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_keep_their_params(hf: HF) -> None:
    c = hf.client()
    alone = c.chat.completions.create(model="smolhf", messages=QUESTION, max_tokens=40,
                                      temperature=0).choices[0].message.content
    results: dict[int, openai.types.chat.ChatCompletion] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            if i == 0:  # the greedy request, inside the batch
                results[i] = c.chat.completions.create(model="smolhf", messages=QUESTION,
                                                       max_tokens=40, temperature=0)
            else:
                results[i] = c.chat.completions.create(
                    model="smolhf", messages=[{"role": "user", "content": f"Write a poem #{i}"}],
                    max_tokens=5 + 4 * i, temperature=0.5 + 0.1 * i, top_p=0.9)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0].choices[0].message.content == alone
    for i in range(1, 6):
        u = results[i].usage
        assert u is not None
        # each request keeps its own length: ends at its own max_tokens unless it finished first
        if results[i].choices[0].finish_reason == "length":
            assert u.completion_tokens == 5 + 4 * i
        else:
            assert u.completion_tokens < 5 + 4 * i
        assert results[i].choices[0].message.content


def test_penalties_and_seed_apply_inside_a_batch(hf: HF) -> None:
    """Presence/frequency/repetition penalties: the same greedy text alone and batched; a seed:
    the same sampled text alone and batched."""
    c = hf.client()
    count = "Count: 1, 2, 3, 4, 5,"
    plain = c.completions.create(model="smolhf", prompt=count, max_tokens=16,
                                 temperature=0).choices[0].text
    penalized = {"frequency_penalty": 1.5, "presence_penalty": 0.5,
                 "extra_body": {"repetition_penalty": 1.3}}
    alone = c.completions.create(model="smolhf", prompt=count, max_tokens=16, temperature=0,
                                 **penalized).choices[0].text  # type: ignore[arg-type]
    assert alone != plain  # the penalties did something

    def seeded(seed: int) -> str:
        return c.completions.create(model="smolhf", prompt="Once upon a time", max_tokens=24,
                                    temperature=1.0, seed=seed).choices[0].text

    seeded_alone = seeded(7)
    assert seeded(7) == seeded_alone  # a seed makes a sampled answer repeatable
    assert seeded(8) != seeded_alone  # and it is sampled: another seed, another text

    results: dict[str, str] = {}
    started = threading.Event()

    def long_one() -> None:  # runs while the others join: they batch together
        stream = c.completions.create(model="smolhf", prompt="Write a long story.",
                                      max_tokens=60, temperature=0, stream=True)
        text = ""
        for part in stream:
            started.set()
            text += part.choices[0].text if part.choices else ""
        results["long"] = text

    t = threading.Thread(target=long_one)
    t.start()
    assert started.wait(120)
    others = [threading.Thread(target=lambda i=i: results.__setitem__(
        f"other{i}", c.completions.create(model="smolhf", prompt=f"Say {i}", max_tokens=20,
                                          temperature=0.8).choices[0].text)) for i in range(2)]
    others.append(threading.Thread(target=lambda: results.__setitem__("seeded", seeded(7))))
    for o in others:
        o.start()
    batched = c.completions.create(model="smolhf", prompt=count, max_tokens=16, temperature=0,
                                   **penalized).choices[0].text  # type: ignore[arg-type]
    for o in [t, *others]:
        o.join(180)
    assert "long" in results and len(results) == 4
    assert batched == alone
    assert results["seeded"] == seeded_alone


def test_stop_string_inside_a_batch(hf: HF) -> None:
    c = hf.client()
    out: dict[str, str] = {}

    def run(key: str, stop: list[str] | None) -> None:
        r = c.completions.create(model="smolhf", prompt="Count: 1, 2, 3, 4,", max_tokens=30,
                                 temperature=0, stop=stop)
        out[key] = r.choices[0].text

    threads = [threading.Thread(target=run, args=("free", None)),
               threading.Thread(target=run, args=("stop", ["7"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "7" in out["free"]
    assert out["stop"] == out["free"][: out["free"].index("7")]


# ---- tools, response_format and logit_bias, at the worker (its own /worker_generate) ----------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city", "parameters": {
        "type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone", "parameters": {
        "type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}}


def _generate(hf: HF, content: str, **fields: object) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": content}], "delta": True, "echo": False,
            "temperature": 0, "max_new_tokens": 60, **fields}
    return httpx.post(hf.workers["smolhf"] + "/worker_generate", json=body, timeout=300).json()


def _valid_calls(frame: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    """The frame's tool calls, each of a tool in `names`, its arguments valid against its schema."""
    jsonschema = pytest.importorskip("jsonschema")
    assert frame["error_code"] == 0, frame
    assert frame["finish_reason"] == "tool_calls" and frame["tool_calls"], frame
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for call in frame["tool_calls"]:
        assert call["name"] in names and call["id"], call
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
    return frame["tool_calls"]


def _case(hf: HF, kind: str, bias: dict[str, float] | None = None) -> dict[str, Any]:
    """One constrained request of each kind (greedy, so alone and batched must agree)."""
    tools: dict[str, Any] = {"tools": [WEATHER, CLOCK], "parallel_tool_calls": False}
    if kind == "required":
        return _generate(hf, "What is the weather in Paris?", tool_choice="required", **tools)
    if kind == "named":
        return _generate(hf, "What is the weather in Paris?", **tools,
                         tool_choice={"type": "function", "function": {"name": "get_time"}})
    if kind == "schema":
        return _generate(hf, "Invent a person.", response_format=PERSON)
    return _generate(hf, "What is the capital of France?", logit_bias=bias)


def _answer(frame: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    return frame["text"], [(c["name"], c["arguments"]) for c in frame.get("tool_calls") or []]


def test_constraints_and_logit_bias_alone_and_inside_a_batch(hf: HF, smol_hf: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_hf)
    plain = _case(hf, "bias")["text"]
    first = tok.encode(plain, add_special_tokens=False)[0]
    bias = {str(first): -100.0}  # the greedy answer's first token, banned
    alone = {kind: _case(hf, kind, bias) for kind in ("required", "named", "schema", "bias")}
    assert [c["name"] for c in _valid_calls(alone["required"], {"get_weather", "get_time"})]
    assert [c["name"] for c in _valid_calls(alone["named"], {"get_time"})] == ["get_time"]
    jsonschema.validate(json.loads(alone["schema"]["text"]), PERSON["json_schema"]["schema"])
    biased = alone["bias"]["text"]
    assert biased and biased != plain and not biased.startswith(tok.decode([first]))

    started = threading.Event()

    def long_one() -> None:  # runs while the others join: they are batched with it
        body = {"prompt": "Write a long story.", "max_new_tokens": 150, "temperature": 0,
                "delta": True, "echo": False}
        with httpx.stream("POST", hf.workers["smolhf"] + "/worker_generate_stream", json=body,
                          timeout=300) as r:
            for _ in r.iter_bytes():
                started.set()

    batched: dict[str, dict[str, Any]] = {}
    threads = [threading.Thread(target=long_one)] + [
        threading.Thread(target=lambda k=kind: batched.__setitem__(k, _case(hf, k, bias)))
        for kind in ("required", "named", "schema", "bias")]
    threads[0].start()
    assert started.wait(120)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(300)
    for kind, frame in alone.items():  # greedy: the same answers alone and batched
        assert batched[kind]["error_code"] == 0, batched[kind]
        assert _answer(batched[kind]) == _answer(frame), kind

# One example turn with a call the schema forbids (`date`): the model copies it unless constrained.
FEW_SHOT = ("<|im_start|>user\nWeather in Rome?<|im_end|>\n<|im_start|>assistant\nLet me check.\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "date": "today"}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_tool_choice_auto_is_free_until_the_call_then_constrained(hf: HF) -> None:
    def run(tool_choice: str) -> dict[str, Any]:
        body = {"prompt": FEW_SHOT, "delta": True, "echo": False, "temperature": 0,
                "max_new_tokens": 50, "tools": [WEATHER, CLOCK], "tool_choice": tool_choice,
                "parallel_tool_calls": False}
        return httpx.post(hf.workers["smolhf"] + "/worker_generate", json=body, timeout=300).json()

    free = run("none")["text"]
    assert '"date"' in free  # unconstrained, it copies the example's extra key
    auto = run("auto")
    assert auto["text"] == free[: free.index("<tool_call>")].rstrip()  # free text first
    [call] = _valid_calls(auto, {"get_weather"})
    assert "date" not in json.loads(call["arguments"])


def test_parallel_tool_calls(hf: HF) -> None:
    several = _generate(hf, "What is the weather in Paris and the time in Tokyo?",
                        tools=[WEATHER, CLOCK], tool_choice="required", max_new_tokens=160)
    # a 135M model keeps calling: a later call the length limit cuts is dropped (toolcalls.py),
    # so every call returned is whole
    complete = several.get("tool_calls") or []
    assert len(complete) >= 2, several
    _valid_calls({**several, "tool_calls": complete, "finish_reason": "tool_calls"},
                 {"get_weather", "get_time"})

def test_unenforceable_schemas_are_refused_naming_the_keyword(hf: HF) -> None:
    unique = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}
    frame = _generate(hf, "Tags?", response_format=unique)
    assert frame["error_code"] == 40001 and "uniqueItems" in frame["text"], frame
    odd = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}
    frame = _generate(hf, "Call f.", tools=[odd], tool_choice="required")
    assert frame["error_code"] == 40001 and '"not"' in frame["text"], frame
    assert _generate(hf, "Say hi.", max_new_tokens=4)["error_code"] == 0  # still serving


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_tools_and_json_schema_through_the_sdk(hf: HF) -> None:
    """The same constrained answers through our API server and the official SDK, streamed and
    not (the worker-level tests above check them alone and inside the batch)."""
    import jsonschema

    c = hf.client()
    kw = dict(model="smolhf", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              tools=[WEATHER, CLOCK], parallel_tool_calls=False, temperature=0, max_tokens=60,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = c.chat.completions.create(**kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = "".join(d.function.arguments or "" for ch in c.chat.completions.create(
        stream=True, **kw) for choice in ch.choices for d in choice.delta.tool_calls or [])
    assert streamed == call.function.arguments
    person = c.chat.completions.create(model="smolhf", response_format=PERSON, temperature=0,
                                       messages=[{"role": "user", "content": "Invent a person."}],
                                       max_tokens=60)
    jsonschema.validate(json.loads(person.choices[0].message.content),
                        PERSON["json_schema"]["schema"])


def test_sdk_parse_with_bounds_stays_within_them(hf: HF) -> None:
    """As on the llama.cpp engine (test_tools.py): Field(ge=0, le=150) and max_length through
    `.parse()`, respected over several prompts."""
    structured_cases.parse_people(hf.client(), "smolhf")


def test_every_strict_mode_keyword_family_is_enforced(hf: HF) -> None:
    structured_cases.every_family(hf.client(), "smolhf")


def test_unenforceable_keywords_get_the_same_400_as_on_llamacpp(hf: HF, stack: Stack) -> None:
    """One compilation for both engines: the same keywords refused with the same error body."""
    here = structured_cases.refusals(hf.client(), "smolhf")
    llamacpp = openai.OpenAI(base_url=stack.api + "/v1", api_key="none", max_retries=0)
    assert here == structured_cases.refusals(llamacpp, "smol")


def test_a_generation_resumes_on_another_worker(hf: HF) -> None:
    """Continuation (the worker side of mid-stream failover): a greedy generation's first
    tokens given back as `generated_token_ids` are generated again (forced, not sent) and the
    answer goes on exactly as before."""
    body = {"messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
            "delta": True, "echo": False, "temperature": 0, "max_new_tokens": 40}

    def frames(extra: dict[str, Any]) -> list[dict[str, Any]]:
        raw = httpx.post(hf.workers["smolhf"] + "/worker_generate_stream",
                         json={**body, **extra}, timeout=300).content
        return [json.loads(f) for f in raw.split(b"\0") if f]

    full = frames({})
    ids = [t for f in full for t in f.get("token_ids", [])]
    text = "".join(f["text"] for f in full)
    assert len(ids) == full[-1]["usage"]["completion_tokens"] > 10
    cut, sent = 0, ""
    for f in full[:4]:  # resume after the first frames
        cut += len(f.get("token_ids", []))
        sent += f["text"]
    rest = frames({"generated_token_ids": ids[:cut]})
    assert sent + "".join(f["text"] for f in rest) == text
    assert [t for f in rest for t in f.get("token_ids", [])] == ids[cut:]
    assert rest[-1]["usage"]["completion_tokens"] == full[-1]["usage"]["completion_tokens"]


def test_embeddings(hf: HF) -> None:
    c = hf.client()
    texts = ["A cat is sitting on the mat.", "A kitten rests on a rug.",
             "The stock market fell sharply today.", "Shares dropped steeply on Wall Street."]
    r = c.embeddings.create(model="minilm", input=texts)
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2, 3]
    assert all(len(v) == 384 for v in vecs)
    assert abs(np.linalg.norm(vecs[0]) - 1) < 1e-4
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.2
    assert _cos(vecs[2], vecs[3]) > _cos(vecs[1], vecs[3]) + 0.2
    assert r.usage.prompt_tokens > 4 * 5

    raw = httpx.post(hf.api + "/v1/embeddings", json={
        "model": "minilm", "input": texts[0], "encoding_format": "base64"}, timeout=60).json()
    b = base64.b64decode(raw["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(b) // 4}f", b)
    assert np.allclose(decoded, vecs[0], atol=1e-6)

    from transformers import AutoTokenizer

    from llmrelay.worker.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("all-minilm-l6-v2").path)
    ids = tok(texts[1])["input_ids"]
    by_ids = c.embeddings.create(model="minilm", input=[ids])
    assert np.allclose(by_ids.data[0].embedding, vecs[1], atol=1e-5)

    ok = c.embeddings.create(model="minilm", input="hello", dimensions=384)
    assert len(ok.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="minilm", input="hello", dimensions=128)
    assert "384" in str(e.value) and e.value.body["param"] == "dimensions"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="minilm", input=[])
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="minilm", input="word " * 400)
    assert "at most 256" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="smolhf", input="hello")  # a chat model serves no embeddings


def test_embeddings_usage_is_counted_as_answered(hf: HF) -> None:
    """Embeddings are charged what their `usage` says (a server without keys: `anonymous`)."""
    def counted() -> tuple[int, int, int]:
        rows = [r for r in httpx.get(hf.api + "/v1/usage").json()["data"]
                if r["model"] == "minilm" and r["key"] == "anonymous"]
        return (sum(r["requests"] for r in rows), sum(r["prompt_tokens"] for r in rows),
                sum(r["completion_tokens"] for r in rows))

    before = counted()
    r = hf.client().embeddings.create(model="minilm", input=["one two three", "four"])
    assert counted() == (before[0] + 1, before[1] + r.usage.prompt_tokens, before[2])


def test_features_in_status(hf: HF) -> None:
    """Each engine says what it honours: the chat model no logprobs but seed, penalties, tools,
    JSON schemas and logit bias, the embedding model embeddings only."""
    def features(name: str) -> dict[str, object]:
        status = httpx.post(hf.workers[name] + "/worker_get_status", timeout=30).json()
        return status["llmrelay"]["features"]

    chat = features("smolhf")
    assert chat["chat"] and chat["completions"] and chat["seed"] and chat["penalties"]
    assert chat["tools"] and chat["json_schema"] and chat["logit_bias"]
    assert not chat["logprobs"] and not chat["embeddings"]
    emb = features("minilm")
    assert emb["embeddings"] and emb["embedding_dimensions"] == [384]
    assert not emb["chat"] and not emb["completions"]


def test_package_imports_no_torch() -> None:
    """Reading the transformers engine's options imports neither torch nor transformers."""
    code = ("import sys, llmrelay.worker.engines.hf as hf; hf.Options; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_load_8bit_on_cpu(hf: HF) -> None:
    # The bundled GGUF through the transformers engine, Linear layers quantized to int8.
    # Dequantizing and quantizing take minutes on a busy 2-core machine.
    p, url = hf.procs.worker(hf.controller, "smol8", "smollm2", extra=(*TRANSFORMERS, "--load-8bit"),
                             load_timeout=300)
    wait_for(lambda: "smol8" in api_models(hf.api), 60, "smol8 in the API")
    assert "quantizing the Linear layers to int8" in p.log()
    r = hf.client().chat.completions.create(model="smol8", messages=QUESTION, max_tokens=20,
                                            temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    p.stop()


def _big_model(folder: Path) -> Path:
    """A folder whose safetensors header declares 32 GiB of float32 weights (no data behind it)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                     "model_type": "llama"}))
    header = json.dumps({"model.embed_tokens.weight": {
        "dtype": "F32", "shape": [8 * 1024 * 1024, 1024], "data_offsets": [0, 32 * 1024**3]}})
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
    return folder


def test_refused_flags(smol_hf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    big = _big_model(tmp_path / "big")
    hf_ = str(smol_hf)
    cases = {
        "cuda": ([hf_, "--device", "cuda"], "--device cuda: torch"),
        "mps": ([hf_, "--device", "mps"], "--device mps"),
        "num-gpus": ([hf_, "--num-gpus", "2"], "--num-gpus 2: spreading a model over GPUs needs CUDA"),
        "4bit": ([hf_, "--load-4bit"], "--load-4bit needs a CUDA GPU"),
        "8and4": ([hf_, "--load-8bit", "--load-4bit"], "exclude each other"),
        "8bit-dtype": ([hf_, "--load-8bit", "--dtype", "bfloat16"], "cannot be combined with --dtype"),
        "gpu-mem": ([hf_, "--max-gpu-memory", "lots"], "is not a size"),
        "memory": ([str(big), "--dtype", "float32"], "needs about"),
        "broken": ([str(broken)], f"transformers could not load {broken}"),
        # a llama.cpp-only flag is said to be ignored (the load then fails as above)
        "kv-cache": ([str(broken), "--kv-cache", "unified"],
                     "--kv-cache is a llamacpp engine setting; the transformers engine ignores it"),
    }
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "llmrelay.cli", "worker", "--no-register", "--port", "1",
             "--engine", "transformers", "--model-path", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (argv, _) in cases.items()
    }
    for name, proc in running.items():
        out, _ = proc.communicate(timeout=240)
        expected = cases[name][1]
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{out[-2000:]}"
        assert "cannot start the worker" in out and expected in out, f"{name}:\n{out[-2000:]}"
        if name == "memory":
            assert "available on cpu" in out and ("try --" in out or "no flag makes it fit" in out)
