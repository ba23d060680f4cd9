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

import httpx
import numpy as np
import openai
import pytest

from conftest import Procs, api_models, registered, wait_for

pytest.importorskip("torch")
pytest.importorskip("transformers")

CONVERT = r"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmrelay.worker.models import resolve
gguf, out = resolve("smollm2").path, sys.argv[1]
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
"""

TRANSFORMERS = ("--engine", "transformers")


@pytest.fixture(scope="session")
def smol_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "smollm2-hf"
    subprocess.run([sys.executable, "-c", CONVERT, str(out)], check=True, timeout=300,
                   capture_output=True)
    assert (out / "config.json").exists()
    return out


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


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


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


def test_features_in_status(hf: HF) -> None:
    """Each engine says what it honours: the chat model no logprobs but seed and penalties, the
    embedding model embeddings only."""
    def features(name: str) -> dict[str, object]:
        status = httpx.post(hf.workers[name] + "/worker_get_status", timeout=30).json()
        return status["llmrelay"]["features"]

    chat = features("smolhf")
    assert chat["chat"] and chat["completions"] and chat["seed"] and chat["penalties"]
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
