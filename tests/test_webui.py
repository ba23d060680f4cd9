"""The web chat at `/`, driven by a real headless Chromium (Debian's chromium + chromedriver,
installed by `make test`) against the session stack: streamed answers, multi-turn history,
switching models, stopping an answer (cancelled on the worker), injection shown as text,
the API-key prompt and the operator view.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Procs, Stack, wait_for
from llmrelay.api.keys import add_key

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"{CHROMIUM} and {CHROMEDRIVER} are needed (make browser installs them: "
                "apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SLOW = 180  # seconds: a hang guard for CPU models on a loaded 2-core machine, not a measure


def new_browser(profile: Path) -> WebDriver:
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,860",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    d = new_browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield d
    finally:
        d.quit()


def until(d: WebDriver, cond, what: str, timeout: float = SLOW):  # type: ignore[no-untyped-def]
    return WebDriverWait(d, timeout, poll_frequency=0.1).until(
        lambda _: cond(), message=f"timed out waiting for {what}")


def open_chat(d: WebDriver, url: str) -> None:
    d.get(url + "/")
    until(d, lambda: len(Select(d.find_element(By.ID, "model")).options) > 0, "the model list")


def settings(d: WebDriver, model: str, max_tokens: int, temperature: str = "0",
             system: str = "") -> None:
    Select(d.find_element(By.ID, "model")).select_by_value(model)
    d.execute_script(
        "document.getElementById('temperature').value = arguments[0];"
        "document.getElementById('max-tokens').value = arguments[1];"
        "document.getElementById('system').value = arguments[2];"
        "document.getElementById('temperature').dispatchEvent(new Event('input'));",
        temperature, str(max_tokens), system)


def assistants(d: WebDriver) -> list:  # type: ignore[type-arg]
    return d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def send(d: WebDriver, text: str) -> object:
    before = len(assistants(d))
    box = d.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    until(d, lambda: len(assistants(d)) == before + 1, "the answer bubble", 10)
    return assistants(d)[-1]


def finished(bubble) -> str:  # type: ignore[no-untyped-def]
    return bubble.get_attribute("data-state") in ("done", "stopped", "error")


def prompt_tokens(bubble) -> int:  # type: ignore[no-untyped-def]
    m = re.search(r"(\d+) prompt \+ (\d+) tokens", bubble.find_element(By.CLASS_NAME, "note").text)
    assert m, bubble.text
    return int(m.group(1))


def worker_served(stack: Stack, url: str) -> int:
    table = httpx.get(stack.controller + "/worker_table").json()
    (w,) = [w for w in table["workers"] if w["name"] == url]
    return int(w["status"]["llmrelay"]["served"])


def cancelled_on_workers(stack: Stack) -> float:
    total = 0.0
    for url in stack.smol_workers:
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith("llmrelay_worker_requests_total{") and 'status="cancelled"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_streams_a_multi_turn_conversation(stack: Stack, browser: WebDriver) -> None:
    d = browser
    open_chat(d, stack.api)
    names = {o.get_attribute("value") for o in Select(d.find_element(By.ID, "model")).options}
    assert names == {"smol", "gemma"}
    settings(d, "smol", 24, system="You are a terse assistant.")
    # Count how many times the answer's text grows: a streamed answer grows step by step.
    d.execute_script("""
        window.__growth = 0;
        new MutationObserver(() => { window.__growth++; })
          .observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});""")
    first = send(d, "Name three colours.")
    until(d, lambda: finished(first), "the first answer")
    assert first.get_attribute("data-state") == "done", first.text
    assert first.find_element(By.CLASS_NAME, "body").text.strip()
    assert d.execute_script("return window.__growth") >= 5  # many partial renders, not one
    p1 = prompt_tokens(first)

    second = send(d, "And three more?")
    until(d, lambda: finished(second), "the second answer")
    assert second.get_attribute("data-state") == "done", second.text
    # The second request carried the first exchange (and the system prompt) along.
    assert prompt_tokens(second) > p1 + 10

    d.find_element(By.ID, "new-chat").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#messages .msg")
    third = send(d, "Name three colours.")
    until(d, lambda: finished(third), "the answer after New chat")
    assert prompt_tokens(third) == p1  # the history is gone, the system prompt stays


def test_switching_model_goes_to_that_model(stack: Stack, browser: WebDriver) -> None:
    d = browser
    open_chat(d, stack.api)
    before = worker_served(stack, stack.gemma_worker)
    settings(d, "gemma", 12)
    bubble = send(d, "Say hi.")
    until(d, lambda: finished(bubble), "gemma's answer")
    assert bubble.get_attribute("data-state") == "done", bubble.text
    assert bubble.find_element(By.CLASS_NAME, "meta").text == "gemma"
    wait_for(lambda: worker_served(stack, stack.gemma_worker) == before + 1, 30,
             "the gemma worker to count the request")


def test_stop_cancels_on_the_worker(stack: Stack, browser: WebDriver) -> None:
    d = browser
    open_chat(d, stack.api)
    cancelled = cancelled_on_workers(stack)
    settings(d, "smol", 1500, temperature="1")
    bubble = send(d, "Write a very long story about a dragon and a lighthouse.")
    until(d, lambda: len(bubble.find_element(By.CLASS_NAME, "body").text) > 10, "some answer text")
    d.find_element(By.ID, "stop").click()
    until(d, lambda: finished(bubble), "the answer to stop", 30)
    assert bubble.get_attribute("data-state") == "stopped"
    assert bubble.find_element(By.CLASS_NAME, "note").text == "stopped"
    # Aborting the fetch closed the stream; the worker's generation was cancelled.
    wait_for(lambda: cancelled_on_workers(stack) == cancelled + 1, 30,
             "a cancelled generation on a smol worker")
    assert d.find_element(By.ID, "send").is_enabled()


INJECTION = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
             '<b>bold?</b> **markdown**')


def test_html_in_messages_is_shown_as_text(stack: Stack, browser: WebDriver) -> None:
    d = browser
    open_chat(d, stack.api)
    d.find_element(By.ID, "new-chat").click()
    settings(d, "smol", 40)
    bubble = send(d, "Repeat exactly: " + INJECTION)
    until(d, lambda: finished(bubble), "the answer")
    user = d.find_elements(By.CSS_SELECTOR, "#messages .msg.user .body")[-1]
    assert user.text == "Repeat exactly: " + INJECTION  # the user's words, as typed
    # Whatever the model echoed, nothing became markup that could run.
    assert not d.find_elements(By.CSS_SELECTOR, "#messages img, #messages script, #messages b")
    assert d.execute_script("return window.__pwned === undefined")


def test_markdown_renderer_escapes_first(browser: WebDriver, stack: Stack) -> None:
    d = browser
    open_chat(d, stack.api)
    text = ("# Title\n**bold** and *it* and `x<y`\n\n```python\nif a < b: print('<b>')\n```\n"
            "- one\n- two <script>alert(1)</script>\n\n[ok](https://example.com/a?b=1&c=2) "
            "[bad](javascript:alert(1)) <img src=x onerror=alert(1)>")
    tags, html, code = d.execute_script("""
        const div = document.createElement('div');
        div.innerHTML = window.LLMRelayMarkdown.render(arguments[0]);
        return [[...div.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                div.innerHTML, div.querySelector('pre code').textContent];""", text)
    assert set(tags) <= {"h3", "strong", "em", "code", "pre", "ul", "li", "p", "a", "br"}
    assert {"h3", "strong", "em", "pre", "ul", "li", "a"} <= set(tags)
    assert tags.count("a") == 1  # only the http(s) link
    assert 'href="https://example.com/a?b=1&amp;c=2"' in html
    assert "&lt;script&gt;" in html and "&lt;img" in html
    assert code == "if a < b: print('<b>')"


def test_api_key_prompt_and_operator_view(stack: Stack, procs: Procs, tmp_path: Path) -> None:
    _, api = procs.api(stack.controller, extra=("--api-keys", "sk-webui"))
    assert httpx.get(api + "/api/workers").status_code == 401
    d = new_browser(tmp_path / "profile")
    try:
        d.get(api + "/")
        dialog = d.find_element(By.ID, "api-key-dialog")
        until(d, lambda: dialog.get_attribute("open") is not None, "the API key prompt", 30)
        assert "API key" in d.find_element(By.ID, "api-key-reason").text
        d.find_element(By.ID, "api-key").send_keys("sk-webui")
        d.find_element(By.ID, "api-key-save").click()
        until(d, lambda: len(Select(d.find_element(By.ID, "model")).options) == 2,
              "the models once the key is given", 30)

        d.find_element(By.ID, "tab-ops").click()
        rows = lambda: d.find_elements(By.CSS_SELECTOR, "#ops-table tbody tr")  # noqa: E731
        until(d, lambda: len(rows()) == 3, "the worker rows", 30)
        shown = {r.find_elements(By.TAG_NAME, "td")[1].text: r for r in rows()}
        assert set(shown) == {*stack.smol_workers, stack.gemma_worker}
        cells = [td.text for td in shown[stack.gemma_worker].find_elements(By.TAG_NAME, "td")]
        assert cells[0] == "gemma" and cells[2] == "llamacpp"
        assert re.fullmatch(r"\d+\.\d s ago", cells[7]) and cells[8] == "ok"
        if os.environ.get("LLMRELAY_WEBUI_SCREENSHOT"):  # beside the chat's picture
            d.save_screenshot(str(Path(os.environ["LLMRELAY_WEBUI_SCREENSHOT"]).with_name(
                "webui-workers.png")))
    finally:
        d.quit()


def test_operator_view_says_so_to_a_key_that_is_not_admin(stack: Stack, procs: Procs,
                                                          tmp_path: Path) -> None:
    """The workers are for admin keys: a key fenced to one model chats, and the Workers tab
    says why it shows nothing (no rows, no other model's name, no worker address)."""
    keys = tmp_path / "keys.toml"
    user = add_key(keys, "fenced", models=["smol"])
    _, api = procs.api(stack.controller, extra=("--api-keys-file", str(keys), "--data-dir",
                                                str(tmp_path / "data")))
    assert httpx.get(api + "/api/workers",
                     headers={"Authorization": f"Bearer {user}"}).status_code == 403
    d = new_browser(tmp_path / "profile")
    try:
        d.get(api + "/")
        dialog = d.find_element(By.ID, "api-key-dialog")
        until(d, lambda: dialog.get_attribute("open") is not None, "the API key prompt", 30)
        d.find_element(By.ID, "api-key").send_keys(user)
        d.find_element(By.ID, "api-key-save").click()
        until(d, lambda: [o.text for o in Select(d.find_element(By.ID, "model")).options]
              == ["smol"], "only the key's model", 30)
        d.find_element(By.ID, "tab-ops").click()
        summary = d.find_element(By.ID, "ops-summary")
        until(d, lambda: "admin keys only" in summary.text, "the refusal on the Workers tab", 30)
        assert "admin = true" in summary.text
        assert not d.find_elements(By.CSS_SELECTOR, "#ops-table tbody tr")
        page = d.find_element(By.TAG_NAME, "body").text
        assert "gemma" not in page and not any(w in page for w in stack.smol_workers)
    finally:
        d.quit()


def test_screenshot(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    """A picture of the page in use (docs/webui.png is made with LLMRELAY_WEBUI_SCREENSHOT)."""
    d = browser
    open_chat(d, stack.api)
    d.find_element(By.ID, "new-chat").click()
    settings(d, "smol", 160, system="You are a helpful assistant. Answer with a short code example.")
    bubble = send(d, "Write a Python function that adds two numbers, in a code block.")
    until(d, lambda: finished(bubble), "the answer")
    time.sleep(0.3)  # let the last render and the cursor animation settle for the picture
    out = tmp_path / "webui.png"
    assert d.save_screenshot(str(out)) and out.stat().st_size > 10_000
    if os.environ.get("LLMRELAY_WEBUI_SCREENSHOT"):
        shutil.copy(out, os.environ["LLMRELAY_WEBUI_SCREENSHOT"])


def test_images_attached_picked_or_dropped_go_with_the_next_message(
        stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    """The Image button's file picker, a drop on the composer and a paste attach images (shown as
    thumbnails, removable) that go with the next message as `image_url` parts: the text-only
    `smol` refuses them naming the part, so they went as images; a file that is no image is
    not attached."""
    from PIL import Image

    png, other = tmp_path / "red.png", tmp_path / "notes.txt"
    Image.new("RGB", (16, 16), (220, 20, 20)).save(png)
    other.write_text("no image")
    open_chat(browser, stack.api)
    browser.find_element(By.ID, "new-chat").click()
    settings(browser, "smol", 8)
    picker = browser.find_element(By.ID, "image-file")
    picker.send_keys(str(png))
    until(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1,
          "the picked image's thumbnail", 10)
    picker.send_keys(str(other))
    until(browser, lambda: "not a PNG, JPEG, GIF or WebP" in
          browser.find_element(By.ID, "status-line").text, "the refusal of a text file", 10)
    # a drop of two image files, as a browser's drag and drop hands them to the page
    browser.execute_script("""
        const dt = new DataTransfer();
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        for (const name of ["a.png", "b.png"]) dt.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("composer").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        const pasted = new DataTransfer();  // and one pasted into the message box
        pasted.items.add(new File([bytes], "c.png", {type: "image/png"}));
        document.getElementById("input").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: pasted, bubbles: true, cancelable: true}));
    """, __import__("base64").b64encode(png.read_bytes()).decode())
    until(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#attachments img")) == 4,
          "four thumbnails", 10)
    browser.find_elements(By.CSS_SELECTOR, "#attachments .thumb button")[3].click()  # one out
    assert len(browser.find_elements(By.CSS_SELECTOR, "#attachments img")) == 3
    bubble = send(browser, "What colour is this?")
    until(browser, lambda: finished(bubble), "the answer")
    assert bubble.get_attribute("data-state") == "error"
    note_text = bubble.find_element(By.CLASS_NAME, "note").text
    assert "The model 'smol' takes no images" in note_text, note_text
    assert "messages[0].content[0].image_url" in note_text, note_text
    user = browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user")[-1]
    shown = user.find_elements(By.CSS_SELECTOR, ".images img")
    assert len(shown) == 3
    # drawn (the page's Content-Security-Policy lets data: images through), at their size
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) == 16 for i in shown)
    assert not browser.find_elements(By.CSS_SELECTOR, "#attachments img")  # sent, so cleared
