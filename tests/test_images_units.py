"""api/images.py without a network: the address checks, data URLs, the image checks (a
decoding bomb refused from its header), the per-request limit, each door's image parts as
references naming the part, and fetches from a real HTTP server on 127.0.0.1 (allowed only when
private addresses are)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from llmrelay.api.chat.protocol import ChatMessage, normalize_messages
from llmrelay.api.errors import APIError
from llmrelay.api.images import (
    ImageFetcher,
    ImagePolicy,
    address_allowed,
    check_image,
    check_url,
    data_url,
)
from llmrelay.api.messages.protocol import MessagesRequest
from llmrelay.api.responses.items import input_items, to_messages


def png(width: int = 4, height: int = 4, color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress (random pixels): width x height x 3 bytes or more."""
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, "PNG")
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with (almost) no pixels: a decoding bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def data_of(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def refused(fn: Any, param: str) -> str:
    with pytest.raises(APIError) as e:
        fn()
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)
    return e.value.message


def arefused(coro: Any, param: str) -> str:
    async def run() -> None:
        await coro
    return refused(lambda: asyncio.run(run()), param)


@pytest.mark.parametrize("address, ok", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("0.0.0.0", False), ("::1", False), ("fe80::1", False),
    ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False),
    ("224.0.0.1", False), ("100.64.0.1", False), ("not an address", False),
    ("93.184.216.34", True), ("8.8.8.8", True), ("2606:4700::1111", True),
    ("::ffff:8.8.8.8", True),
])
def test_only_public_addresses_are_fetched_from(address: str, ok: bool) -> None:
    assert address_allowed(address) is ok


def test_urls_to_private_hosts_are_refused_unless_allowed() -> None:
    p = "messages[0].content[1].image_url"
    assert "private, loopback or link-local" in arefused(
        check_url("http://127.0.0.1:9/x.png", ImagePolicy(), p), p)
    assert "169.254.169.254" in arefused(
        check_url("http://169.254.169.254/latest/meta-data", ImagePolicy(), p), p)
    assert "localhost" in arefused(check_url("http://localhost/x.png", ImagePolicy(), p), p)
    assert "only http, https" in arefused(check_url("file:///etc/passwd", ImagePolicy(), p), p)
    assert "only http, https" in arefused(check_url("ftp://8.8.8.8/x", ImagePolicy(), p), p)
    assert "cannot be read" in arefused(check_url("http://[::1/x", ImagePolicy(), p), p)
    assert "cannot be read" in arefused(check_url("http://8.8.8.8:99999/x", ImagePolicy(), p), p)
    # the operator's exemptions: every private address, or named hosts
    asyncio.run(check_url("http://127.0.0.1:9/x.png", ImagePolicy(allow_private=True), p))
    asyncio.run(check_url("http://localhost/x.png",
                          ImagePolicy(allowed_hosts=frozenset({"localhost"})), p))


def test_images_are_checked_from_their_header() -> None:
    p = "input[0].content[0].image_url"
    assert check_image(png(), ImagePolicy(), p) == "image/png"
    jpeg = io.BytesIO()
    Image.new("RGB", (3, 3)).save(jpeg, "JPEG")
    assert check_image(jpeg.getvalue(), ImagePolicy(), p) == "image/jpeg"
    # a decoding bomb: 8,000 x 8,000 in its header, refused before any pixel is decoded
    assert "8000x8000" in refused(lambda: check_image(bomb_png(8000, 8000), ImagePolicy(), p), p)
    assert "more than this server's limit" in refused(
        lambda: check_image(bomb_png(2**30, 2**30), ImagePolicy(), p), p)
    assert "5000x5000" in refused(lambda: check_image(bomb_png(5000, 5000),
                                                      ImagePolicy(max_pixels=1_000_000), p), p)
    assert "not an image" in refused(lambda: check_image(b"GIF89a nonsense", ImagePolicy(), p), p)
    assert "not an image" in refused(lambda: check_image(png()[:-20], ImagePolicy(), p), p)
    assert "bytes" in refused(lambda: check_image(png(64, 64), ImagePolicy(max_bytes=50), p), p)
    bmp = io.BytesIO()
    Image.new("RGB", (2, 2)).save(bmp, "BMP")
    assert "format BMP" in refused(lambda: check_image(bmp.getvalue(), ImagePolicy(), p), p)


def test_data_urls_are_decoded_within_the_limits() -> None:
    p = "messages[0].content[0].source.data"
    assert data_url(data_of(png()), ImagePolicy(), p) == png()
    assert "data:image" in refused(lambda: data_url("data:text/plain;base64,AAAA",
                                                    ImagePolicy(), p), p)
    assert "data:image" in refused(lambda: data_url("data:image/png,rawbytes", ImagePolicy(), p),
                                   p)
    assert "base64" in refused(lambda: data_url("data:image/png;base64,@@@@", ImagePolicy(), p),
                               p)
    assert "bytes" in refused(lambda: data_url(data_of(b"x" * 4000), ImagePolicy(max_bytes=100),
                                               p), p)


def chat(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return normalize_messages([ChatMessage(role="user", content=list(parts))])


def test_each_door_names_its_image_parts() -> None:
    url = data_of(png())
    assert chat({"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": url, "detail": "low"}}) == [
        {"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "url": url, "param": "messages[0].content[1].image_url"}]}]
    items = input_items([{"role": "user", "content": [
        {"type": "input_image", "image_url": url, "detail": "auto"},
        {"type": "input_text", "text": "And this?"}]}])
    assert items[0]["content"][0] == {"type": "input_image", "image_url": url, "detail": "auto"}
    assert to_messages(None, items)[0]["content"] == [
        {"type": "image_url", "url": url, "param": "input[0].content[0].image_url"},
        {"type": "text", "text": "And this?"}]
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png()).decode()}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            {"type": "text", "text": "Compare."}]}]})
    assert body.chat_messages()[0]["content"] == [
        {"type": "image_url", "url": url, "param": "messages[0].content[0].source.data"},
        {"type": "image_url", "url": "https://example.com/a.png",
         "param": "messages[0].content[1].source.url"},
        {"type": "text", "text": "Compare."}]
    # text alone is one string, as before images
    assert chat({"type": "text", "text": "a"}, {"type": "text", "text": "b"})[0]["content"] == "a\nb"


def test_resolve_puts_the_image_in_and_counts_them() -> None:
    url = data_of(png())
    messages = chat({"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"})
    out = asyncio.run(ImageFetcher().resolve(messages))
    assert out[0]["content"] == [
        {"type": "image", "data": base64.b64encode(png()).decode(), "mime": "image/png"},
        {"type": "text", "text": "?"}]
    many = chat(*[{"type": "image_url", "image_url": {"url": url}}] * 3)
    assert "at most 2 images" in arefused(ImageFetcher(ImagePolicy(max_images=2)).resolve(many),
                                          "messages[0].content[2].image_url")
    bomb = chat({"type": "text", "text": "?"},
                {"type": "image_url", "image_url": {"url": data_of(bomb_png(60_000, 60_000))}})
    arefused(ImageFetcher().resolve(bomb), "messages[0].content[1].image_url")


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def images_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving a PNG, redirects and a few bad answers."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    Handler.routes = {
        "/red.png": (200, {"Content-Type": "image/png"}, png()),
        "/page": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/big.png": (200, {"Content-Type": "image/png"}, noise_png(100, 100)),
        "/to-red": (302, {"Location": "/red.png"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield base
    server.shutdown()
    server.server_close()


def test_fetches_from_a_local_server(images_server: str) -> None:
    p = "messages[0].content[0].image_url"
    private = ImagePolicy(allow_private=True)

    async def fetch(path: str, policy: ImagePolicy = private) -> bytes:
        fetcher = ImageFetcher(policy)
        try:
            return await fetcher.fetch(images_server + path, p)
        finally:
            await fetcher.aclose()

    assert "private, loopback" in arefused(fetch("/red.png", ImagePolicy()), p)
    assert asyncio.run(fetch("/red.png")) == png()
    assert asyncio.run(fetch("/to-red")) == png()
    assert "'text/html', not an image" in arefused(fetch("/page"), p)
    assert "HTTP 404" in arefused(fetch("/nothing"), p)
    assert "redirected more than" in arefused(fetch("/loop"), p)
    assert "bytes" in arefused(fetch("/big.png", ImagePolicy(allow_private=True,
                                                             max_bytes=1000)), p)
    # a redirect is checked again: the named host is allowed, where it sends is not
    named = ImagePolicy(allowed_hosts=frozenset({"127.0.0.1"}))
    assert asyncio.run(fetch("/to-red", named)) == png()
    assert "169.254.169.254" in arefused(fetch("/to-metadata", named), p)
