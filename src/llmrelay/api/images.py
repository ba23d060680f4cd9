"""Images in chat messages: the front doors' image parts, fetched and checked by the API server.

Each front door turns its image parts (chat's `image_url`, the Responses API's `input_image`,
Messages' `image` blocks) into a reference, `{"type": "image_url", "url": ..., "param": ...}`,
in the message's content list (`content_of`), naming the request part for errors. Admission
(pipeline.GenerationServing.admit) first refuses images for a model whose workers take none,
then `ImageFetcher.resolve` replaces each reference by the image itself, as our workers'
`images` extension takes it: `{"type": "image", "data": <base64>, "mime": "image/png"}`.

Safety (docs/images.md): at most `max_images` per request; a data URL or a fetched body of at
most `max_bytes`; an http(s) URL whose host resolves only to public addresses (every address,
checked again at each redirect, which is followed by hand), unless the operator allows private
ones (`allow_private`) or names the host (`allowed_hosts`); a time-out for the whole fetch; an
`image/*` content type; a format Pillow reads (PNG, JPEG, GIF, WebP) whose header's dimensions
are at most `max_pixels`, read before anything is decoded (a decoding bomb is refused
unopened). Every refusal is a 400 naming the part (`messages[0].content[1].image_url`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmrelay.api.errors import APIError, bad_param

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
IMAGE_REF = "image_url"  # a door's reference, before it is fetched
IMAGE = "image"  # the image itself, as the worker takes it


@dataclass(frozen=True)
class ImagePolicy:
    """The limits on images in requests (the API server's `--image-*` flags)."""

    max_images: int = 8  # per request, the whole conversation counted
    max_bytes: int = 10 * 1024 * 1024  # an image's encoded size (a data URL's decoded)
    max_pixels: int = 25_000_000  # width x height, from the header, before decoding
    timeout: float = 10.0  # seconds for one URL's whole fetch, redirects included
    max_redirects: int = 3
    allow_private: bool = False  # fetch from loopback, private, link-local addresses too
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)  # exempt from that check


def image_ref(url: Any, param: str) -> dict[str, Any]:
    """A door's image part as a reference for `resolve`; 400 when `url` is not a string."""
    if not isinstance(url, str) or not url:
        raise bad_param(param, f"{param} must be a URL (http, https or data:image/...).")
    return {"type": IMAGE_REF, "url": url, "param": param}


def content_of(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A message's content from its text parts (`{"type": "text", "text": ...}`) and image
    references: the texts joined by newlines when there is no image (as before images), else
    the parts in order."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def text_of(content: str | list[dict[str, Any]]) -> str:
    """A content's text alone (its images left out)."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def refs(messages: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The image references in chat messages, in order."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            yield from (p for p in content if isinstance(p, dict) and p.get("type") == IMAGE_REF)


# ---- addresses -------------------------------------------------------------------------------


def address_allowed(address: str) -> bool:
    """Whether an IP address is public: not loopback, private, link-local, multicast, reserved
    or unspecified (an IPv4 address mapped into IPv6 is judged as itself)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_exempt(host: str, policy: ImagePolicy) -> bool:
    return policy.allow_private or host.lower().rstrip(".") in policy.allowed_hosts


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def check_url(url: str, policy: ImagePolicy, param: str) -> None:
    """400 unless `url` is http(s) and its host may be fetched from (see the module docstring)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a bracketed host unclosed, a port out of range
        raise bad_param(param, f"{param}: the URL cannot be read.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_param(param, f"{param}: only http, https and data:image URLs are taken.")
    host = parts.hostname
    if host_exempt(host, policy):
        return
    try:
        addresses = await resolve_host(host, port)
    except (OSError, UnicodeError):
        raise bad_param(param, f"{param}: the host '{host[:100]}' cannot be resolved.") from None
    refused = [a for a in addresses if not address_allowed(a)]
    if refused or not addresses:
        raise bad_param(param, f"{param}: the host '{host[:100]}' resolves to a private, "
                        f"loopback or link-local address ({', '.join(refused[:3])}), which this "
                        "server does not fetch from (see --allow-private-image-urls and "
                        "--allowed-image-hosts).", "image_url_not_allowed")


# ---- the image itself --------------------------------------------------------------------------


def check_image(data: bytes, policy: ImagePolicy, param: str) -> str:
    """The image's MIME type, once its header shows a format we take and dimensions within the
    limit (nothing decoded yet), and its structure checks out; 400 otherwise."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > policy.max_bytes:
        raise too_large(param, policy)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: ours below
            with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
                fmt, (width, height) = img.format, img.size
                if fmt not in FORMATS:
                    raise bad_param(param, f"{param}: image format {fmt} is not taken; send "
                                    "PNG, JPEG, GIF or WebP.", "invalid_image")
                if width * height > policy.max_pixels:
                    raise bad_param(param, f"{param}: the image is {width}x{height} pixels, "
                                    f"more than this server's limit of {policy.max_pixels} "
                                    "pixels per image.", "image_too_large")
                img.verify()  # the structure (PNG's chunk checksums), still without pixels
    except APIError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, past ours too
        raise bad_param(param, f"{param}: the image has more than this server's limit of "
                        f"{policy.max_pixels} pixels per image.", "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise bad_param(param, f"{param}: the data is not an image this server can read (PNG, "
                        "JPEG, GIF or WebP).", "invalid_image") from None
    return FORMATS[fmt]


def too_large(param: str, policy: ImagePolicy) -> APIError:
    return bad_param(param, f"{param}: the image is larger than this server's limit of "
                     f"{policy.max_bytes} bytes.", "image_too_large")


def data_url(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL (within the size limit)."""
    head, comma, payload = url.partition(",")
    if not comma or not head.lower().startswith("data:image/") or not head.lower().endswith(
            ";base64"):
        raise bad_param(param, f"{param}: a data URL must be data:image/...;base64,<data>.")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise too_large(param, policy)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_param(param, f"{param}: the data URL's base64 cannot be decoded.") from None


class ImageFetcher:
    """Fetches and checks a request's images under a policy (see the module docstring)."""

    def __init__(self, policy: ImagePolicy | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.policy = policy or ImagePolicy()
        self._client = client  # made at the first fetch

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # no proxies from the environment: we check the addresses
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def count(self, messages: list[dict[str, Any]]) -> int:
        """The request's images; 400 naming the first past the limit."""
        found = list(refs(messages))
        if len(found) > self.policy.max_images:
            param = found[self.policy.max_images]["param"]
            raise bad_param(param, f"{param}: a request may hold at most "
                            f"{self.policy.max_images} images; this one holds {len(found)}.",
                            "too_many_images")
        return len(found)

    async def resolve(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages with each image reference replaced by the image (our workers'
        `images` extension); 400s naming the part."""
        if not self.count(messages):
            return messages
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                parts = await asyncio.gather(*(self._part(p) for p in content))
                m = {**m, "content": list(parts)}
            out.append(m)
        return out

    async def _part(self, part: dict[str, Any]) -> dict[str, Any]:
        if part.get("type") != IMAGE_REF:
            return part
        url, param = part["url"], part["param"]
        if url[:5].lower() == "data:":
            data = data_url(url, self.policy, param)
        else:
            try:
                async with asyncio.timeout(self.policy.timeout):
                    data = await self.fetch(url, param)
            except TimeoutError:
                raise bad_param(param, f"{param}: the image URL did not answer within "
                                f"{self.policy.timeout:g} s.", "image_fetch_failed") from None
        mime = await asyncio.to_thread(check_image, data, self.policy, param)
        return {"type": IMAGE, "data": base64.b64encode(data).decode(), "mime": mime}

    async def fetch(self, url: str, param: str) -> bytes:
        """The body at `url`, redirects followed by hand (each target checked again)."""
        for _ in range(self.policy.max_redirects + 1):
            await check_url(url, self.policy, param)
            try:
                async with self.client.stream("GET", url, timeout=self.policy.timeout) as r:
                    if r.is_redirect:
                        url = urllib.parse.urljoin(url, r.headers.get("location", ""))
                        continue
                    return await self._body(r, param)
            except httpx.HTTPError as e:
                raise bad_param(param, f"{param}: the image URL could not be fetched "
                                f"({type(e).__name__}).", "image_fetch_failed") from None
        raise bad_param(param, f"{param}: the image URL redirected more than "
                        f"{self.policy.max_redirects} times.", "image_fetch_failed")

    async def _body(self, r: httpx.Response, param: str) -> bytes:
        if r.status_code != 200:
            raise bad_param(param, f"{param}: fetching the image URL answered HTTP "
                            f"{r.status_code}.", "image_fetch_failed")
        kind = r.headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind.startswith("image/"):
            raise bad_param(param, f"{param}: the URL's content type is '{kind[:60]}', not an "
                            "image.", "invalid_image")
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise too_large(param, self.policy)
        body = bytearray()
        async for chunk in r.aiter_bytes():
            body += chunk
            if len(body) > self.policy.max_bytes:
                raise too_large(param, self.policy)
        return bytes(body)
