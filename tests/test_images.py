"""Images at the front doors, through real processes and the official SDKs: the API server
fetches and checks image parts before any worker sees them (SSRF refusals, redirects checked
again, a decoding bomb refused from its header, the per-request limit), and a text-only model
refuses an image with a 400 naming the model."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from test_images_units import bomb_png, png

from conftest import Procs, api_models, registered, wait_for


class Served(http.server.BaseHTTPRequestHandler):
    """A tiny image server on 127.0.0.1: /red.png, and /to-red redirecting to it by IP."""

    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        Served.hits.append(self.path)
        if self.path == "/red.png":
            body = png()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
        else:
            body = b""
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}"
                             "/red.png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Served)
    Served.hits = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def apis(procs: Procs) -> dict[str, str]:
    """One text-only model (smol on llama.cpp) behind three API servers: the defaults,
    private image URLs allowed, and host `localhost` allowed with at most 2 images."""
    _, controller = procs.controller()
    _, worker = procs.worker(controller, "smol")
    wait_for(lambda: registered(controller, worker), 60, "the worker")
    out = {}
    for name, extra in [("default", ()), ("private", ("--allow-private-image-urls",)),
                        ("named", ("--allowed-image-hosts", "localhost",
                                   "--max-images-per-request", "2"))]:
        _, out[name] = procs.api(controller, extra=extra)
        wait_for(lambda api=out[name]: api_models(api) == {"smol"}, 30, "smol in the API")
    return out


def oai(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=60)


def chat_image(api: str, url: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        oai(api).chat.completions.create(model="smol", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url,
                                                                             "detail": "low"}}]}])
    return e.value


def test_image_urls_are_fetched_safely(apis: dict[str, str], image_server: int) -> None:
    local = f"http://127.0.0.1:{image_server}/red.png"
    param = "messages[0].content[1].image_url"
    # loopback refused by default, never fetched
    e = chat_image(apis["default"], local)
    assert e.status_code == 400 and e.body["param"] == param  # type: ignore[index]
    assert "private, loopback or link-local" in e.message and Served.hits == []
    # allowed with --allow-private-image-urls: fetched and checked, then refused by the
    # text-only model, by name
    e = chat_image(apis["private"], local)
    assert Served.hits == ["/red.png"]
    assert e.status_code == 400 and e.body["param"] == param  # type: ignore[index]
    assert "The model 'smol' takes no images" in e.message
    assert e.body["code"] == "model_takes_no_images"  # type: ignore[index]
    # a named host is fetched from; its redirect to a loopback address is refused
    e = chat_image(apis["named"], f"http://localhost:{image_server}/to-red")
    assert Served.hits == ["/red.png", "/to-red"]
    assert e.status_code == 400 and "127.0.0.1" in e.message and "private" in e.message
    # streamed: the same 400 before any event
    with pytest.raises(openai.BadRequestError):
        oai(apis["default"]).chat.completions.create(model="smol", max_tokens=4, stream=True,
                                                     messages=[{"role": "user", "content": [
                                                         {"type": "image_url", "image_url": {
                                                             "url": local}}]}])
    # the cloud metadata address, by IP
    e = chat_image(apis["default"], "http://169.254.169.254/latest/meta-data/")
    assert e.status_code == 400 and "169.254.169.254" in e.message


def test_bad_images_are_400s_naming_the_part(apis: dict[str, str]) -> None:
    bomb = base64.b64encode(bomb_png(9000, 9000)).decode()
    claude = anthropic.Anthropic(base_url=apis["default"], api_key="none", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="smol", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Look."},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": bomb}}]}])
    err = e.value.body["error"]  # type: ignore[index]
    assert err["type"] == "invalid_request_error"
    assert "messages[0].content[1].source.data" in err["message"]
    assert "9000x9000" in err["message"]
    # too many images (the limit is 2 there), on the Responses API
    red = "data:image/png;base64," + base64.b64encode(png()).decode()
    with pytest.raises(openai.BadRequestError) as too_many:
        oai(apis["named"]).responses.create(model="smol", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": red, "detail": "auto"}] * 3}])
    assert too_many.value.body["param"] == "input[0].content[2].image_url"  # type: ignore[index]
    assert "at most 2 images" in too_many.value.message
    # a good image to a text-only model, on each door: a 400 naming the model
    with pytest.raises(openai.BadRequestError) as text_only:
        oai(apis["default"]).responses.create(model="smol", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What colour?"},
            {"type": "input_image", "image_url": red}]}])
    assert "The model 'smol' takes no images" in text_only.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="smol", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png()).decode()}}]}])
    assert "The model 'smol' takes no images" in e.value.body["error"]["message"]  # type: ignore[index]
    # not an image at all
    r = httpx.post(apis["default"] + "/v1/chat/completions", timeout=30, json={
        "model": "smol", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url"
    assert "not an image" in r.json()["error"]["message"]
    models = httpx.get(apis["default"] + "/v1/models").json()["data"]
    assert "vision" not in models[0]["features"]
