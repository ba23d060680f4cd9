"""Images through the llama.cpp engine, end to end: the bundled SmolLM2 GGUF with a tiny
random-weight projector (`tiny_mmproj`, made at test time) given by `--mmproj`, served by a real
worker behind a real API server, asked with the official SDKs, streamed and not. Random weights
test the plumbing: the image's tokens count in the prompt, different images give different
greedy answers and the same image the same (its cells reused from the slot's cache), requests
with images batch with others, and a text-only request is answered as by a worker without a
projector."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from PIL import Image

from conftest import (
    TINY_VLM_IMAGE_TOKENS,
    TINY_VLM_PROMPT,
    Procs,
    api_models,
    greedy_chat,
    registered,
    tiny_vlm_messages,
    tiny_vlm_png,
    tiny_vlm_url,
    wait_for,
)

MAX_TOKENS = 12
GREEDY = {"temperature": 0}  # (the Anthropic SDK in use has no temperature argument)
# The image part and the text part of one message are joined by a newline (as text parts are).
NEWLINE = 1


@dataclass
class Served:
    api: str
    worker: str  # `vlm`: SmolLM2 with --mmproj
    plain: str  # `plain`: SmolLM2 without

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0, timeout=120)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.api, api_key="none", max_retries=0, timeout=120)

    def reused(self) -> int:
        """Prompt tokens the vlm worker has taken from its slots' caches so far."""
        status = httpx.post(self.worker + "/worker_get_status").json()
        return int(status["llmrelay"]["prefix_cache"]["tokens"])


@pytest.fixture(scope="module")
def served(tiny_mmproj: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    procs = Procs(tmp_path_factory.mktemp("mmproj-logs"))
    try:
        _, controller = procs.controller()
        _, worker = procs.worker(controller, "vlm", wait=False,
                                 extra=("--mmproj", str(tiny_mmproj)))
        _, plain = procs.worker(controller, "plain", wait=False)
        for url in (worker, plain):
            wait_for(lambda url=url: registered(controller, url), 120, f"worker {url}")
        _, api = procs.api(controller)
        wait_for(lambda: api_models(api) == {"vlm", "plain"}, 30, "the models in the API")
        yield Served(api, worker, plain)
    finally:
        procs.stop_all()


def ask_chat(s: Served, color: str | None, stream: bool = False, model: str = "vlm") -> tuple[str, int]:
    text_part = {"type": "text", "text": TINY_VLM_PROMPT}
    content: Any = (TINY_VLM_PROMPT if color is None else
                    [{"type": "image_url", "image_url": {"url": tiny_vlm_url(color)}}, text_part])
    return greedy_chat(s.openai(), model, content, MAX_TOKENS, stream)


def test_the_worker_reads_images(served: Served) -> None:
    models = {m["id"]: m for m in httpx.get(served.api + "/v1/models").json()["data"]}
    assert "vision" in models["vlm"]["features"]
    assert "vision" not in models["plain"]["features"]
    ours = httpx.post(served.worker + "/worker_get_status").json()["llmrelay"]
    assert ours["features"]["vision"] is True
    assert "images" in ours["extensions"]


def test_chat_images_reach_the_model(served: Served) -> None:
    _, text_only = ask_chat(served, None)
    red, red_prompt = ask_chat(served, "red")
    assert red_prompt == text_only + TINY_VLM_IMAGE_TOKENS + NEWLINE  # the marker became 64 tokens
    blue, blue_prompt = ask_chat(served, "blue", stream=True)
    assert blue_prompt == red_prompt
    assert blue != red

    # the same image again: the same answer, its whole prompt but the last token (the image's
    # cells included) reused from the slot that holds it
    before = served.reused()
    assert ask_chat(served, "red", stream=True) == (red, red_prompt)
    assert served.reused() - before == red_prompt - 1
    # a new image shares at most the text before it: never the cells of another image
    before = served.reused()
    green, _ = ask_chat(served, "green")
    assert served.reused() - before < TINY_VLM_IMAGE_TOKENS
    assert green not in (red, blue)


def test_messages_images(served: Served) -> None:
    """The Messages door, streamed and not: the same answers as chat completions; a WebP
    image too."""
    client = served.anthropic()
    red, red_prompt = ask_chat(served, "red")
    blue, _ = ask_chat(served, "blue")

    m = client.messages.create(model="vlm", messages=tiny_vlm_messages("red"), extra_body=GREEDY,
                               max_tokens=MAX_TOKENS)
    assert "".join(b.text for b in m.content if b.type == "text") == red
    assert m.usage.input_tokens == red_prompt
    with client.messages.stream(model="vlm", messages=tiny_vlm_messages("blue"), extra_body=GREEDY,
                                max_tokens=MAX_TOKENS) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == blue
    assert final.usage.input_tokens == red_prompt
    # the same pixels as a lossless WebP (which llama.cpp's own decoder does not read): red's answer
    buf = io.BytesIO()
    Image.open(io.BytesIO(tiny_vlm_png("red"))).save(buf, "WEBP", lossless=True)
    webp = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/webp",
                                     "data": base64.b64encode(buf.getvalue()).decode()}},
        {"type": "text", "text": TINY_VLM_PROMPT}]}]
    m = client.messages.create(model="vlm", messages=webp, extra_body=GREEDY, max_tokens=MAX_TOKENS)
    assert "".join(b.text for b in m.content if b.type == "text") == red


def test_images_in_one_batch_with_text(served: Served) -> None:
    """Requests with different images and one without, at once: each its own answer (each
    image evaluated into its own sequence between the batched steps)."""
    alone = {c: ask_chat(served, c) for c in ("red", "blue", None)}
    colors = ["red", "blue", None, "blue", "red"]
    with ThreadPoolExecutor(len(colors)) as pool:
        answers = list(pool.map(lambda c: ask_chat(served, c, stream=c == "blue"), colors))
    assert answers == [alone[c] for c in colors]


def test_text_only_is_unchanged_by_the_projector(served: Served) -> None:
    """A text-only request on the worker with a projector: the same bytes as on a worker
    without one (chat and completions, greedy)."""
    for stream in (False, True):
        assert ask_chat(served, None, stream) == ask_chat(served, None, stream, model="plain")
    client = served.openai()
    texts = [client.completions.create(model=m, prompt="The capital of France is", temperature=0,
                                       max_tokens=MAX_TOKENS).choices[0].text for m in ("vlm", "plain")]
    assert texts[0] == texts[1]


def test_a_bad_projector_stops_the_worker_with_the_reason(procs: Procs, tmp_path: Path) -> None:
    """`--mmproj` naming no file, or a GGUF that is no projector (a language model): the worker
    exits non-zero at start and its log says why."""
    from llmrelay.worker.models import resolve

    _, controller = procs.controller()
    for given, says in ((str(tmp_path / "missing.gguf"), "--mmproj: no such file"),
                        (str(resolve("gemma3-270m").path), "--mmproj: llama.cpp could not load")):
        proc, _ = procs.worker(controller, names="bad-projector", wait=False,
                               extra=("--mmproj", given))
        assert proc.proc is not None
        rc = proc.proc.wait(timeout=120)
        log = proc.log()
        assert rc != 0 and "cannot start the worker" in log and says in log, log[-2000:]
