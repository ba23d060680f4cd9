"""Images through the transformers engine, end to end: a tiny random-weight LLaVA (`tiny_vlm`,
made at test time) served by a real worker behind a real API server, asked with the official
SDKs on all three doors, streamed and not. Random weights test the plumbing: the image's tokens
count in the prompt, the greedy answer is transformers' own (pixel values given to `generate`),
so different images give different answers and the same image the same, and the same image
again hits the prefix cache while a new one does not."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

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

MAX_TOKENS = 8  # as the reference answers
GREEDY = {"temperature": 0}  # (the Anthropic SDK in use has no temperature argument)


@dataclass
class VLM:
    api: str
    worker: str
    reference: dict[str, Any]
    controller: str

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key="none", max_retries=0, timeout=120)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.api, api_key="none", max_retries=0, timeout=120)

    def prefix_cache(self) -> dict[str, Any]:
        status = httpx.post(self.worker + "/worker_get_status").json()
        return dict(status["llmrelay"]["prefix_cache"])


@pytest.fixture(scope="module")
def vlm(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLM]:
    procs = Procs(tmp_path_factory.mktemp("vlm-logs"))
    try:
        _, controller = procs.controller()
        _, worker = procs.worker(controller, "vlm", str(tiny_vlm), load_timeout=180,
                                 extra=("--engine", "transformers"))
        wait_for(lambda: registered(controller, worker), 60, "the vlm worker")
        _, api = procs.api(controller)
        wait_for(lambda: api_models(api) == {"vlm"}, 30, "the model in the API")
        yield VLM(api, worker, json.loads((tiny_vlm / "reference.json").read_text()), controller)
    finally:
        procs.stop_all()


def chat_content(color: str | None) -> list[dict[str, Any]]:
    text = {"type": "text", "text": TINY_VLM_PROMPT}
    image = {"type": "image_url", "image_url": {"url": tiny_vlm_url(color)}}
    return [text] if color is None else [image, text]


def ask_chat(vlm: VLM, color: str | None, stream: bool = False) -> tuple[str, int]:
    return greedy_chat(vlm.openai(), "vlm", chat_content(color), MAX_TOKENS, stream)


def test_the_model_says_it_reads_images(vlm: VLM) -> None:
    model = httpx.get(vlm.api + "/v1/models").json()["data"][0]
    assert "vision" in model["features"]
    ours = httpx.post(vlm.worker + "/worker_get_status").json()["llmrelay"]
    assert ours["features"]["vision"] is True
    assert "images" in ours["extensions"]
    assert ours["prefix_cache"]["enabled"] is True


def test_chat_images_reach_the_model_and_the_prefix_cache(vlm: VLM) -> None:
    ref = vlm.reference
    _, text_only = ask_chat(vlm, None)
    red, red_prompt = ask_chat(vlm, "red")
    # the template's one `<image>` placeholder became the image's tokens
    assert red_prompt == text_only + TINY_VLM_IMAGE_TOKENS == ref["red"]["prompt_tokens"]
    assert red == ref["red"]["text"]  # transformers' own answer with the pixel values
    blue, blue_prompt = ask_chat(vlm, "blue", stream=True)
    assert blue_prompt == red_prompt
    assert blue == ref["blue"]["text"] != red

    # the same image again: the same answer, its prefix (image tokens included) from the cache
    before = vlm.prefix_cache()
    assert ask_chat(vlm, "red", stream=True) == (red, red_prompt)
    after = vlm.prefix_cache()
    assert after["hits"] == before["hits"] + 1
    assert after["tokens"] - before["tokens"] >= TINY_VLM_IMAGE_TOKENS  # a whole 64-token block
    # a new image shares the text before it but not the image's tokens: no hit, its own answer
    green, _ = ask_chat(vlm, "green")
    assert vlm.prefix_cache()["hits"] == after["hits"]
    assert green not in (red, blue)


def test_responses_images(vlm: VLM) -> None:
    client = vlm.openai()
    ref = vlm.reference

    def content(color: str) -> Any:
        return [{"role": "user", "content": [{"type": "input_image", "image_url": tiny_vlm_url(color)},
                                             {"type": "input_text", "text": TINY_VLM_PROMPT}]}]

    r = client.responses.create(model="vlm", input=content("blue"), temperature=0,
                                max_output_tokens=MAX_TOKENS)
    assert r.output_text == ref["blue"]["text"]
    assert r.usage is not None and r.usage.input_tokens == ref["blue"]["prompt_tokens"]
    text, done = "", None
    for event in client.responses.create(model="vlm", input=content("red"), temperature=0,
                                         max_output_tokens=MAX_TOKENS, stream=True):
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type in ("response.completed", "response.incomplete"):
            done = event.response
    assert text == ref["red"]["text"]
    assert done is not None and done.usage is not None
    assert done.usage.input_tokens == ref["red"]["prompt_tokens"]


def test_messages_images(vlm: VLM) -> None:
    client = vlm.anthropic()
    ref = vlm.reference

    m = client.messages.create(model="vlm", messages=tiny_vlm_messages("red"), extra_body=GREEDY,
                               max_tokens=MAX_TOKENS)
    assert "".join(b.text for b in m.content if b.type == "text") == ref["red"]["text"]
    assert m.usage.input_tokens == ref["red"]["prompt_tokens"]
    with client.messages.stream(model="vlm", messages=tiny_vlm_messages("blue"), extra_body=GREEDY,
                                max_tokens=MAX_TOKENS) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == ref["blue"]["text"]
    assert final.usage.input_tokens == ref["blue"]["prompt_tokens"]


def test_images_in_one_batch_with_text(vlm: VLM) -> None:
    """Requests with different images and one without, at once: each its own answer (the batch
    manager reads each image's ids from its own features)."""
    colors = ["red", "blue", None, "blue", "red"]
    with ThreadPoolExecutor(len(colors)) as pool:
        answers = list(pool.map(lambda c: ask_chat(vlm, c, stream=c == "blue"), colors))
    for color, (text, prompt) in zip(colors, answers, strict=True):
        if color is not None:
            assert (text, prompt) == (vlm.reference[color]["text"], vlm.reference[color]["prompt_tokens"])


def test_llmrelay_chat_image_command_reaches_the_model(vlm: VLM, tmp_path: Path) -> None:
    """`llmrelay chat`'s `/image PATH` (through a pseudo-terminal): the answer is the model's
    own for that image, and the next message goes without it."""
    import sys

    pexpect = pytest.importorskip("pexpect")
    png = tmp_path / "red.png"
    png.write_bytes(tiny_vlm_png("red"))
    child = pexpect.spawn(sys.executable, ["-m", "llmrelay.cli", "chat", "--base-url",
                                           vlm.api + "/v1", "--model", "vlm", "--temperature",
                                           "0", "--max-tokens", str(MAX_TOKENS)],
                          encoding="utf-8", timeout=120, dimensions=(50, 400))
    try:
        child.expect_exact("you> ")
        child.sendline(f"/image {png}")
        child.expect_exact("attached to your next message")
        child.expect_exact("you> ")
        child.sendline(TINY_VLM_PROMPT)
        child.expect_exact("vlm> ")
        child.expect_exact("you> ")
        # the model's answer, as printed (the random model's text may hold line breaks)
        shown = child.before.replace("\r\n", "\n").rstrip("\n")
        assert shown == vlm.reference["red"]["text"].rstrip("\n")
        child.sendline("history")
        child.expect_exact("you> ")
        assert f"[user] [image] {TINY_VLM_PROMPT}" in child.before
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_web_chat_sends_a_picked_image_to_the_model(vlm: VLM, tmp_path: Path) -> None:
    """The web chat (headless Chromium): an image picked with the Image button goes with the
    message; the answer is the model's own for it, and the prompt counts its tokens."""
    webui = pytest.importorskip("test_webui")  # skips without Chromium, as the web chat's tests
    from selenium.webdriver.common.by import By

    png = tmp_path / "blue.png"
    png.write_bytes(tiny_vlm_png("blue"))
    d = webui.new_browser(tmp_path / "profile")
    try:
        webui.open_chat(d, vlm.api)
        webui.settings(d, "vlm", MAX_TOKENS)
        d.find_element(By.ID, "image-file").send_keys(str(png))
        webui.until(d, lambda: d.find_elements(By.CSS_SELECTOR, "#attachments img"),
                    "the thumbnail", 10)
        bubble = webui.send(d, TINY_VLM_PROMPT)
        webui.until(d, lambda: webui.finished(bubble), "the answer")
        assert bubble.get_attribute("data-state") == "done", bubble.text
        said = d.execute_script("return chat.messages[chat.messages.length - 1].content")
        assert said == vlm.reference["blue"]["text"]
        assert webui.prompt_tokens(bubble) == vlm.reference["blue"]["prompt_tokens"]
    finally:
        d.quit()


def test_compare_view_sends_the_image_to_both_and_the_vote_keeps_a_mark(
        vlm: VLM, procs: Procs, tmp_path: Path) -> None:
    """The console's compare view (headless Chromium), the VLM against the text-only smol: an
    image dropped on the prompt goes to both; the VLM's prompt counts the image's tokens, smol
    refuses it with the 400 that says so; the vote stores the conversation with "[image]" in
    place of the image."""
    webui = pytest.importorskip("test_webui")  # skips without Chromium, as the web chat's tests
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select

    _, smol = procs.worker(vlm.controller, "smol")
    wait_for(lambda: registered(vlm.controller, smol), 60, "the smol worker")
    wait_for(lambda: api_models(vlm.api) == {"vlm", "smol"}, 30, "both models in the API")
    d = webui.new_browser(tmp_path / "profile")
    try:
        webui.open_chat(d, vlm.api)
        d.find_element(By.ID, "tab-compare").click()
        d.execute_script("document.getElementById('cmp-max-tokens').value = arguments[0];",
                         str(MAX_TOKENS))
        Select(d.find_element(By.ID, "cmp-model-a")).select_by_value("vlm")
        Select(d.find_element(By.ID, "cmp-model-b")).select_by_value("smol")
        d.execute_script("""
            const dt = new DataTransfer();
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], "red.png", {type: "image/png"}));
            document.getElementById("cmp-composer").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        """, base64.b64encode(tiny_vlm_png("red")).decode())
        webui.until(d, lambda: d.find_elements(By.CSS_SELECTOR, "#cmp-attachments img"),
                    "the thumbnail", 10)
        box = d.find_element(By.ID, "cmp-input")
        box.send_keys(TINY_VLM_PROMPT)
        box.send_keys(Keys.ENTER)

        def answer(side: str) -> Any:
            found = d.find_elements(By.CSS_SELECTOR, f"#msgs-{side} .msg.assistant")
            return found[-1] if found and webui.finished(found[-1]) else None

        webui.until(d, lambda: answer("a") and answer("b"), "both answers")
        # (the compare view samples at the server's default temperature: the prompt counts)
        assert answer("a").get_attribute("data-state") == "done", answer("a").text
        assert webui.prompt_tokens(answer("a")) == vlm.reference["red"]["prompt_tokens"]
        assert answer("b").get_attribute("data-state") == "error"
        assert "The model 'smol' takes no images" in answer("b").text
        for side in "ab":  # the image shows in both panes' user bubbles
            assert d.find_elements(By.CSS_SELECTOR, f"#msgs-{side} .msg.user .images img")
        webui.until(d, lambda: not d.find_element(By.ID, "vote-a").get_attribute("disabled"),
                    "the vote buttons", 10)
        d.find_element(By.ID, "vote-a").click()
        webui.until(d, lambda: "Voted" in d.find_element(By.ID, "vote-result").text, "the vote",
                    30)
    finally:
        d.quit()
    last = json.loads(httpx.get(vlm.api + "/api/arena/battles").text.splitlines()[-1])
    assert last["model_a"] == "vlm" and last["winner"] == "model_a"
    assert last["conversation_a"][0]["content"] == f"[image]\n{TINY_VLM_PROMPT}"
