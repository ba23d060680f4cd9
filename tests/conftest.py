"""Shared fixtures: real llmrelay processes on free loopback ports, real bundled models.

One stack is started per test session (controller, two SmolLM2 workers named `smol`, one
Gemma 3 270M worker named `gemma`, API server). Tests that kill or restart processes start
their own with `Procs`.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from llmrelay.worker.managed import free_port

# SmolLM2 as an HF folder, for the transformers engine: the bundled GGUF loaded and dequantized by
# transformers, its GGUF quantizer marker cleared, saved with save_pretrained (`smol_hf`).
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

# A tiny random-weight vision-language model for the transformers engine (`tiny_vlm`): LLaVA
# with a one-layer CLIP vision tower (64x64 pixels in 8x8 patches: 64 image tokens per image)
# and a two-layer Llama text model, SmolLM2's tokenizer with an `<image>` token, a CLIP image
# processor and a ChatML template that writes `<image>` for an image part, saved together as
# one processor folder. Weights drawn with a large spread (seeded) so that different images give
# different greedy answers. `reference.json`: transformers' own greedy answers (pixel values
# given to `generate`) to TINY_VLM_PROMPT with each TINY_VLM_COLORS image.
TINY_VLM = r"""
import io, json, sys
import torch
from PIL import Image
from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
src, out, prompt, colors = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
tok = AutoTokenizer.from_pretrained(src)
tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
            "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}"
            "<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, image_size=64, patch_size=8, projection_dim=32)
text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   tie_word_embeddings=True, initializer_range=0.5)
cfg = LlavaConfig(vision_config=vision, text_config=text,
                  image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                  vision_feature_select_strategy="default", image_seq_length=64)
cfg.initializer_range = 0.5
torch.manual_seed(0)
model = LlavaForConditionalGeneration(cfg).eval()
model.save_pretrained(out)
images = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
proc = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, chat_template=template,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
proc.save_pretrained(out)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
rendered = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
reference = {}
for color in colors:
    picture = Image.new("RGB", (80, 60), color)
    inputs = proc(text=[rendered], images=[picture], add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    reference[color] = {"ids": ids.tolist(), "text": tok.decode(ids),
                        "prompt_tokens": int(inputs["input_ids"].shape[1])}
(__import__("pathlib").Path(out) / "reference.json").write_text(json.dumps(reference))
"""
TINY_VLM_PROMPT = "Describe the picture."
TINY_VLM_COLORS = ("red", "blue")  # 80x60 PNGs of one colour each: `tiny_vlm_png(color)`
TINY_VLM_IMAGE_TOKENS = 64

HEARTBEAT = "1"  # seconds; tests use a short interval so expiry and rejoin are quick
# Workers run one llama.cpp thread each: several workers spinning two threads each on a 2-core
# machine slow every one of them down many times over.


def wait_for(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Proc:
    """One llmrelay process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmrelay.cli", *self.argv],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Procs:
    """Starts processes for one test and stops them all afterwards."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Proc] = []

    def controller(self, port: int | None = None, extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._start(f"controller-{port}", ["controller", "--port", str(port),
                                                "--heartbeat-interval", HEARTBEAT, *extra])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/test_connection").status_code == 200, 30,
                 "the controller")
        return p, url

    def worker(self, controller: str, names: str = "smol", model: str = "smollm2",
               port: int | None = None, wait: bool = True,
               extra: tuple[str, ...] = (), load_timeout: float = 60) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._start(f"worker-{names}-{port}", [
            "worker", "--port", str(port), "--controller-address", controller,
            "--model-path", model, "--model-names", names, "--heartbeat-interval", HEARTBEAT,
            "--context-length", "2048", "--n-threads", "1", *extra])
        url = f"http://127.0.0.1:{port}"
        if wait:
            wait_for(lambda: httpx.post(url + "/worker_get_status").status_code == 200,
                     load_timeout,
                     f"worker {names}")
        return p, url

    def api(self, controller: str, port: int | None = None, extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._start(f"api-{port}", ["api", "--port", str(port), "--controller-address",
                                        controller, "--table-refresh", "0.5", *extra])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, 30, "the API server")
        return p, url

    def _start(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.log_dir).start()
        self.all.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.all):
            p.stop(timeout=5)


def registered(controller: str, worker_url: str) -> bool:
    table = httpx.get(controller + "/worker_table").json()
    return any(w["name"] == worker_url for w in table["workers"])


def api_models(api: str) -> set[str]:
    return {m["id"] for m in httpx.get(api + "/v1/models").json()["data"]}


@dataclass
class Stack:
    controller: str
    api: str
    smol_workers: list[str]
    gemma_worker: str
    procs: Procs

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0,
                             timeout=120, **kw)  # type: ignore[arg-type]

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the smol workers run and queue nothing (an earlier test's generations can
        outlive it). A greedy answer of these tiny quantized models can change with what else
        shares its batch (llama.cpp's kernels differ with the batch's size), so tests comparing
        greedy answers start on idle workers."""
        def idle() -> bool:
            for url in self.smol_workers:
                status = httpx.post(url + "/worker_get_status").json()
                if status.get("queue_length") or (status.get("llmrelay") or {}).get("running"):
                    return False
            return True
        wait_for(idle, timeout, "the shared smol workers to be idle")


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The processes' state folder (API servers' usage databases, stacks' tokens), here rather
    than in the user's own; first of the session's fixtures (autouse)."""
    path = tmp_path_factory.mktemp("state")
    before = os.environ.get("LLMRELAY_STATE_DIR")
    os.environ["LLMRELAY_STATE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("LLMRELAY_STATE_DIR", None)
    else:
        os.environ["LLMRELAY_STATE_DIR"] = before


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def stack(logs_dir: Path) -> Iterator[Stack]:
    procs = Procs(logs_dir)
    try:
        _, controller = procs.controller()
        _, smol1 = procs.worker(controller, "smol", wait=False)
        _, smol2 = procs.worker(controller, "smol", wait=False)
        _, gemma = procs.worker(controller, "gemma", "gemma3-270m", wait=False)
        for url in (smol1, smol2, gemma):
            wait_for(lambda url=url: registered(controller, url), 120, f"worker {url}")
        _, api = procs.api(controller)
        wait_for(lambda: api_models(api) == {"smol", "gemma"}, 30, "models in the API")
        yield Stack(controller, api, [smol1, smol2], gemma, procs)
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def smol_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 as an HF folder (made once per session; see CONVERT)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf") / "smollm2-hf"
    subprocess.run([sys.executable, "-c", CONVERT, str(out)], check=True, timeout=600,
                   capture_output=True)
    assert (out / "config.json").exists()
    return out


@pytest.fixture(scope="session")
def tiny_vlm(smol_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight LLaVA folder with its processor, for the transformers engine
    (made once per session; see TINY_VLM). Its `reference.json` holds transformers' own greedy
    answers for TINY_VLM_PROMPT with each TINY_VLM_COLORS image."""
    out = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    subprocess.run([sys.executable, "-c", TINY_VLM, str(smol_hf), str(out), TINY_VLM_PROMPT,
                    ",".join(TINY_VLM_COLORS)], check=True, timeout=600, capture_output=True)
    assert (out / "reference.json").exists()
    return out


@pytest.fixture(scope="session")
def tiny_mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight projector GGUF for the bundled SmolLM2 GGUF, for the llama.cpp
    engine's `--mmproj` (made once per session with the `gguf` package): a LLaVA `mlp` projector
    (576 wide, SmolLM2's embeddings) over a one-layer CLIP vision tower of 64x64 pixels in 8x8
    patches, so TINY_VLM_IMAGE_TOKENS tokens per image. Weights drawn with a large spread
    (seeded) so that different images give different greedy answers."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    out = tmp_path_factory.mktemp("mmproj") / "mmproj-tiny.gguf"
    w = gguf.GGUFWriter(str(out), "clip")
    keys, vision = gguf.Keys.Clip, gguf.Keys.ClipVision
    width, ff, size, patch, n_text = 32, 64, 64, 8, 576
    w.add_bool(keys.HAS_VISION_ENCODER, True)
    w.add_bool(keys.HAS_LLAVA_PROJECTOR, True)
    w.add_string(keys.PROJECTOR_TYPE, "mlp")
    for key, value in ((vision.IMAGE_SIZE, size), (vision.PATCH_SIZE, patch),
                       (vision.EMBEDDING_LENGTH, width), (vision.FEED_FORWARD_LENGTH, ff),
                       (vision.BLOCK_COUNT, 1), (vision.PROJECTION_DIM, n_text),
                       (vision.Attention.HEAD_COUNT, 2)):
        w.add_uint32(key, value)
    w.add_float32(vision.Attention.LAYERNORM_EPS, 1e-5)
    w.add_array(vision.IMAGE_MEAN, [0.5, 0.5, 0.5])
    w.add_array(vision.IMAGE_STD, [0.5, 0.5, 0.5])
    w.add_bool(vision.USE_GELU, True)
    rng = np.random.default_rng(0)
    shapes: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (width, 3, patch, patch), "v.class_embd": (width,),
        "v.position_embd.weight": ((size // patch) ** 2 + 1, width),
        "v.pre_ln.weight": (width,), "v.pre_ln.bias": (width,)}
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        shapes |= {f"v.blk.0.{name}.weight": (width, width), f"v.blk.0.{name}.bias": (width,)}
    for name in ("ln1", "ln2"):
        shapes |= {f"v.blk.0.{name}.weight": (width,), f"v.blk.0.{name}.bias": (width,)}
    shapes |= {"v.blk.0.ffn_up.weight": (ff, width), "v.blk.0.ffn_up.bias": (ff,),
               "v.blk.0.ffn_down.weight": (width, ff), "v.blk.0.ffn_down.bias": (width,),
               "mm.0.weight": (n_text, width), "mm.0.bias": (n_text,),
               "mm.2.weight": (n_text, n_text), "mm.2.bias": (n_text,)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.5).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def tiny_vlm_png(color: str) -> bytes:
    """The 80x60 PNG of one colour that `tiny_vlm`'s reference answers saw."""
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), color).save(buf, "PNG")
    return buf.getvalue()


def tiny_vlm_url(color: str) -> str:
    """`tiny_vlm_png(color)` as a data URL."""
    return "data:image/png;base64," + base64.b64encode(tiny_vlm_png(color)).decode()


def tiny_vlm_messages(color: str) -> Any:
    """A Messages API conversation of one user turn: `tiny_vlm_png(color)` as a base64 image
    block, then TINY_VLM_PROMPT."""
    data = base64.b64encode(tiny_vlm_png(color)).decode()
    return [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": TINY_VLM_PROMPT}]}]


def greedy_chat(client: openai.OpenAI, model: str, content: Any, max_tokens: int,
                stream: bool = False) -> tuple[str, int]:
    """(answer, prompt tokens) of one greedy user message through chat completions, whole or
    streamed (usage from the stream's last chunk)."""
    messages: Any = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=max_tokens)
        assert r.usage is not None
        return r.choices[0].message.content or "", r.usage.prompt_tokens
    text, prompt = "", -1
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
    return text, prompt


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return stack.client()
