"""Images for the llama.cpp engine: a GGUF vision model's projector (`--mmproj PATH`, or an
`mmproj*.gguf` file next to the model) through llama.cpp's multimodal library (libmtmd, shipped
with llama-cpp-python).

A prompt with images is rendered by the chat template with mtmd's marker in each image's place,
then tokenized by mtmd (`Projector.tokenize`): text chunks of token ids, and image chunks that
mtmd has already decoded and resized by the projector's own rules (its image size, patch size,
mean and std). Its token list (`Prompt.tokens`) holds the text ids and, at each image token's
position, an *image id*: a negative number made from the SHA-256 of the image's bytes and the
position inside the image. The engine never puts those in a batch: its scheduler evaluates an
image chunk for one sequence between its batched steps (`Projector.evaluate`: the vision tower,
then llama_decode of the image's embeddings at the sequence's positions), and the text around it
in the batched steps like any prompt. Since a slot's cached prefix is compared token by token,
the image ids key an image's cells by its content: the same image again (the next turn of a
conversation, the same request again) reuses them, a different image never does; a prefix that
ends inside an image is cut back to the image's start (mtmd evaluates an image whole).

Limits: projectors whose positions are not one per token (M-RoPE: Qwen2-VL and later) are
refused at load; audio projectors are not used.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
from llama_cpp._logger import llama_log_callback
from PIL import Image

from llmrelay.protocol import ErrorCode
from llmrelay.worker.engines.base import EngineError

log = logging.getLogger("llmrelay.worker")

MARKER = mtmd.mtmd_default_marker().decode()  # where the chat template puts an image


def marked(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each list content as one string, as a GGUF chat template takes it:
    its text parts joined by newlines (as the API server joins text parts), each image part as
    MARKER in its place."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": "\n".join(
                MARKER if p.get("type") == "image" else str(p.get("text", ""))
                for p in content if isinstance(p, dict))}
        out.append(m)
    return out


def image_ids(data: bytes, n: int) -> list[int]:
    """The ids of an image's `n` tokens: negative, from the image's content and the position."""
    h = int.from_bytes(hashlib.sha256(data).digest()[:6], "big")
    return [-(1 + (h << 20) + i) for i in range(n)]


def rgb(data: bytes) -> tuple[int, int, Any]:
    """An image's width, height and RGB bytes, decoded by Pillow (every format the API server
    accepts: llama.cpp's own decoder reads no WebP); EngineError for bytes it cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise EngineError(f"an image could not be decoded: {e}", ErrorCode.VALIDATION_TYPE_ERROR) from e
    raw = pixels.tobytes()
    return pixels.width, pixels.height, (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)


@dataclass
class ImageSpan:
    """One image chunk of a prompt: its first position and its token count."""

    start: int
    n: int
    chunk: Any  # mtmd_input_chunk_p, owned by its Prompt's chunks

    @property
    def end(self) -> int:
        return self.start + self.n


@dataclass
class Prompt:
    """A prompt tokenized by mtmd: its token list (image ids at the images' positions) and
    its image chunks. Holds mtmd's chunks until `free`."""

    tokens: list[int]
    images: list[ImageSpan] = field(default_factory=list)
    chunks: Any = None

    def image_at(self, pos: int) -> ImageSpan | None:
        """The image starting at `pos`, if one does."""
        return next((s for s in self.images if s.start == pos), None)

    def text_until(self, pos: int) -> int:
        """Where the text from `pos` ends: the next image's start, else the prompt's end."""
        return next((s.start for s in self.images if s.start >= pos), len(self.tokens))

    def reusable(self, n: int) -> int:
        """`n` cached positions cut back to an image's start when they end inside it."""
        for s in self.images:
            if s.start < n < s.end:
                return s.start
        return n

    def free(self) -> None:
        if self.chunks is not None:
            mtmd.mtmd_input_chunks_free(self.chunks)
            self.chunks = None
            self.images = []


class Projector:
    """A loaded projector for one model; its mtmd calls take a lock (the tokenizing threads and
    the scheduler thread share its context)."""

    def __init__(self, path: Path, model: Any, n_threads: int, gpu: bool) -> None:
        # mtmd's logs through llama-cpp-python's (errors only, as the model's with verbose=False)
        mtmd.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = True
        self.path = path
        self.ctx = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not self.ctx:
            raise EngineError(f"--mmproj: llama.cpp could not load {path} for this model "
                              "(not a projector, or one for a model of another width)")
        if not mtmd.mtmd_support_vision(self.ctx):
            self.close()
            raise EngineError(f"--mmproj: {path.name} reads no images (an audio projector?)")
        if mtmd.mtmd_decode_use_mrope(self.ctx):
            self.close()
            raise EngineError(f"--mmproj: {path.name} places image tokens in two dimensions "
                              "(M-RoPE), which this engine cannot serve yet")
        self.lock = threading.Lock()

    def tokenize(self, text: str, images: list[bytes], add_special: bool) -> Prompt:
        """`text` (one MARKER per image, in order) and the images as mtmd's chunks; EngineError
        (400) for an image llama.cpp cannot read or markers that do not match the images."""
        with self.lock:
            bitmaps = []
            try:
                for data in images:
                    bmp = mtmd.mtmd_bitmap_init(*rgb(data))
                    if not bmp:
                        raise EngineError("llama.cpp could not take an image",
                                          ErrorCode.VALIDATION_TYPE_ERROR)
                    bitmaps.append(bmp)
                chunks = mtmd.mtmd_input_chunks_init()
                raw = text.encode("utf-8")
                inp = mtmd.mtmd_input_text(raw, len(raw), add_special, True)
                arr = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
                rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            finally:
                for bmp in bitmaps:
                    mtmd.mtmd_bitmap_free(bmp)
            prompt = Prompt([], chunks=chunks)
            if rc != 0:
                prompt.free()
                what = {1: f"the images do not match the image markers of the rendered prompt "
                           f"({text.count(MARKER)} markers, {len(images)} images)",
                        2: "llama.cpp could not preprocess an image"}.get(rc, f"code {rc}")
                raise EngineError(f"mtmd_tokenize failed: {what}", ErrorCode.VALIDATION_TYPE_ERROR)
            n_image = 0
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                kind = mtmd.mtmd_input_chunk_get_type(chunk)
                if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    prompt.tokens.extend(ptr[j] for j in range(n.value))
                    continue
                n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                prompt.images.append(ImageSpan(len(prompt.tokens), n_tokens, chunk))
                prompt.tokens.extend(image_ids(images[n_image], n_tokens))
                n_image += 1
        if prompt.images and prompt.images[-1].end == len(prompt.tokens):
            prompt.free()  # its last position must be text: a step's logits sample the answer
            raise EngineError("a prompt must not end with an image", ErrorCode.VALIDATION_TYPE_ERROR)
        return prompt

    def evaluate(self, lctx: Any, span: ImageSpan, seq_id: int, n_batch: int) -> None:
        """Encode the image and write its embeddings into `seq_id`'s cells from `span.start`."""
        new_n_past = llama_cpp.llama_pos(0)
        with self.lock:
            rc = mtmd.mtmd_helper_eval_chunk_single(self.ctx, lctx, span.chunk, span.start, seq_id,
                                                    n_batch, False, ctypes.byref(new_n_past))
        if rc != 0:
            raise RuntimeError(f"mtmd could not evaluate an image (code {rc})")

    def close(self) -> None:
        if self.ctx:
            mtmd.mtmd_free(self.ctx)
            self.ctx = None
