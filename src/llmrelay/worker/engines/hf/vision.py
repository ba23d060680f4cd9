"""Images for the transformers engine's vision-language models (image-text-to-text: LLaVA,
Idefics3/SmolVLM, Gemma 3 and their kin, loaded with `AutoProcessor` and
`AutoModelForImageTextToText`).

The batch manager (transformers' continuous batching) takes token ids only: no pixel values.
So an image reaches the model through its token ids. The model's processor expands each image
of the rendered conversation into its image tokens (`Vision.prompt`); before the request is
queued, each image's features (vision tower and projector, `get_image_features`) are computed
once and the request's image tokens replaced by *image ids* past the vocabulary, a range of its
own for each distinct image (`Vision.embed`). The language model's input embedding is wrapped
(`ImageEmbedding`): a token id inside the vocabulary is embedded as before, an image id reads
its row of the image's features, which is what the model's own forward puts at those positions
(`masked_scatter` of the features over the image tokens). Prompts with images then prefill and
decode in the continuous batch as any other, and the batch manager's prefix cache, which hashes
token ids, keys an image's tokens by the image's content: two different images never share a
cached block, the same image (same bytes) again maps to the same ids and hits.

An image's features stay while a request uses them, and after it as a cache (the same image
sent again skips the vision tower) up to CACHE_BYTES, least recently used first out. An image
evicted and sent again gets a new range. Ids are never handed out again while blocks computed
with them may be cached: once the space past the vocabulary is used up (2^31 ids, the batch
manager's int32 ids), no new image is taken until none is in use, then the numbering restarts
and the manager's cached blocks are dropped before its next prefix match (`epoch`).

Limits: models whose positions depend on the image (Qwen2-VL's M-RoPE) or whose attention is
not causal over image tokens (Gemma 3's bidirectional image attention) need the image at
prefill and are not served exactly by this scheme; `TransformersEngine` refuses the first kind.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llmrelay.protocol import ErrorCode
from llmrelay.worker.engines.base import EngineError

CACHE_BYTES = 256 * 2**20  # image features kept for reuse when no request uses them
ID_LIMIT = 2**31 - 1  # the batch manager keeps token ids as int32
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_vision_model(path: Path) -> bool:
    """An HF folder of a vision-language model: a config with a vision part, and a processor
    that reads images."""
    if path.is_file() or not any((path / name).exists() for name in PROCESSOR_FILES):
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as a processor's chat template takes them: image parts as `{"type":
    "image"}` (the template writes the image's placeholder; the bytes go to the processor)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": [{"type": "image"} if isinstance(p, dict) and p.get("type") == "image"
                                  else p for p in content]}
        out.append(m)
    return out


def decode(data: bytes) -> Image.Image:
    """An image's pixels (RGB); EngineError for bytes Pillow cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise EngineError(f"an image could not be decoded: {e}", ErrorCode.VALIDATION_TYPE_ERROR) from e


@dataclass
class _Entry:
    """One distinct image: its features (one row per image token) and its id range."""

    start: int  # its first image id
    rows: torch.Tensor  # [tokens, hidden]
    users: int = 0  # requests in flight that use it


@dataclass
class Uses:
    """The images one request holds (released when it ends)."""

    digests: list[str] = field(default_factory=list)


class ImageEmbedding(torch.nn.Module):
    """The language model's input embedding, which also reads image ids (>= n_vocab): each
    one the row of its image's features."""

    def __init__(self, embed: torch.nn.Module, vision: Vision) -> None:
        super().__init__()
        self.embed = embed
        self.vision = vision

    @property
    def weight(self) -> torch.Tensor:  # tied output layers and resizing read it
        return self.embed.weight  # type: ignore[return-value]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n_vocab = self.vision.n_vocab
        mask = ids >= n_vocab
        if not bool(mask.any()):
            return self.embed(ids)  # type: ignore[no-any-return]
        out = self.embed(ids.masked_fill(mask, 0))
        out[mask] = self.vision.rows_of(ids[mask] - n_vocab).to(device=out.device, dtype=out.dtype)
        return out  # type: ignore[no-any-return]


class Vision:
    """A vision-language model's images: the processor's prompt, the image features, the image
    ids and their cache (see the module docstring). Thread-safe."""

    def __init__(self, processor: Any, model: Any, n_vocab: int) -> None:
        self.processor = processor
        self.model = model
        self.n_vocab = n_vocab
        token_id = getattr(processor, "image_token_id", None)
        if token_id is None:
            token_id = getattr(model.config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(model.config, "image_token_index", None)
        if token_id is None:
            raise EngineError("the model's processor names no image token")
        self.image_token = int(token_id)
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # by image digest, LRU first
        self.next_id = 0  # the next free image id (past the vocabulary)
        self.epoch = 0  # bumped when the numbering restarts (cached blocks must go)
        self.cached_bytes = 0
        features = model.get_image_features
        self.feature_args = set(inspect.signature(features).parameters)
        model.set_input_embeddings(ImageEmbedding(model.get_input_embeddings(), self))

    # ---- the prompt ---------------------------------------------------------------------------

    def prompt(self, text: str, images: list[bytes]) -> list[int]:
        """The token ids of a rendered conversation with its images: each image's placeholder
        expanded into its image tokens by the processor's own rules."""
        pictures = [decode(b) for b in images]
        try:
            out = self.processor(text=[text], images=pictures or None, add_special_tokens=False)
        except (ValueError, TypeError, RuntimeError) as e:
            raise EngineError(f"the model's processor refused the images: {e}",
                              ErrorCode.VALIDATION_TYPE_ERROR) from e
        ids = out["input_ids"][0]
        return [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]

    # ---- image features and ids --------------------------------------------------------------

    @torch.inference_mode()
    def _features(self, data: bytes) -> torch.Tensor:
        """An image's features, one row per image token, as the model merges them."""
        inputs = self.processor.image_processor([decode(data)], return_tensors="pt")
        args = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items() if k in self.feature_args}
        if "pixel_values" in args:
            args["pixel_values"] = args["pixel_values"].to(self.model.dtype)
        out = self.model.get_image_features(**args, return_dict=True)
        feats = getattr(out, "pooler_output", None)
        if feats is None:
            feats = out[0] if isinstance(out, tuple) else out
        parts = list(feats) if isinstance(feats, list | tuple) else [feats]
        hidden = parts[0].shape[-1]
        return torch.cat([p.reshape(-1, hidden) for p in parts]).detach()

    def embed(self, tokens: list[int], images: list[bytes], uses: Uses) -> list[int]:
        """`tokens` with each image's tokens replaced by the image's ids (the images in their
        order in the prompt); the images are held by `uses` until `release`."""
        positions = [i for i, t in enumerate(tokens) if t == self.image_token]
        out = list(tokens)
        at = 0
        for data in images:
            digest = hashlib.sha256(data).hexdigest()
            entry = self._hold(digest, data, uses)
            n = entry.rows.shape[0]
            if at + n > len(positions):
                self.release(uses)
                raise EngineError(f"the prompt has {len(positions)} image tokens, fewer than its "
                                  f"images' features ({at + n} so far)", ErrorCode.VALIDATION_TYPE_ERROR)
            for j in range(n):
                out[positions[at + j]] = self.n_vocab + entry.start + j
            at += n
        if at != len(positions):
            self.release(uses)
            raise EngineError(f"the prompt has {len(positions)} image tokens for {at} image "
                              "features (image tokens written as text?)", ErrorCode.VALIDATION_TYPE_ERROR)
        return out

    def _hold(self, digest: str, data: bytes, uses: Uses) -> _Entry:
        with self.lock:
            entry = self.entries.get(digest)
            if entry is not None:
                self.entries.move_to_end(digest)
                if entry.users == 0:
                    self.cached_bytes -= _size(entry)
                entry.users += 1
                uses.digests.append(digest)
                return entry
        rows = self._features(data)  # outside the lock: the vision tower takes time
        with self.lock:
            entry = self.entries.get(digest)  # another request may have made it meanwhile
            if entry is None:
                entry = _Entry(self._allocate(rows.shape[0]), rows)
                self.entries[digest] = entry
            elif entry.users == 0:
                self.cached_bytes -= _size(entry)
            entry.users += 1
            uses.digests.append(digest)
            return entry

    def _allocate(self, n: int) -> int:
        """A fresh range of `n` image ids (lock held)."""
        if self.n_vocab + self.next_id + n > ID_LIMIT:
            if any(e.users for e in self.entries.values()):
                raise EngineError("this worker's image ids are used up until the images in use "
                                  "are done; try again", ErrorCode.ENGINE_OVERLOADED)
            self.entries.clear()
            self.cached_bytes = 0
            self.next_id = 0
            self.epoch += 1  # the batch manager drops its cached blocks before its next match
        start = self.next_id
        self.next_id += n
        return start

    def release(self, uses: Uses) -> None:
        """A request is done with its images: they stay cached, within CACHE_BYTES."""
        with self.lock:
            for digest in uses.digests:
                entry = self.entries.get(digest)
                if entry is not None and entry.users > 0:
                    entry.users -= 1
                    if entry.users == 0:
                        self.cached_bytes += _size(entry)
            uses.digests.clear()
            for digest in list(self.entries):
                if self.cached_bytes <= CACHE_BYTES:
                    break
                entry = self.entries[digest]
                if entry.users == 0:
                    self.cached_bytes -= _size(entry)
                    del self.entries[digest]

    def rows_of(self, image_ids: torch.Tensor) -> torch.Tensor:
        """The feature rows of image ids (relative to n_vocab), from the model's forward."""
        with self.lock:
            spans = sorted(((e.start, e.rows) for e in self.entries.values()), key=lambda s: s[0])
        starts = torch.tensor([s for s, _ in spans], dtype=torch.long, device=image_ids.device)
        which = torch.searchsorted(starts, image_ids.long(), right=True) - 1
        out = torch.empty((image_ids.numel(), spans[0][1].shape[-1]), dtype=spans[0][1].dtype,
                          device=spans[0][1].device)
        for k in which.unique().tolist():
            sel = which == k
            start, rows = spans[k]
            out[sel] = rows[(image_ids[sel] - start).to(rows.device)]
        return out


def _size(entry: _Entry) -> int:
    return entry.rows.numel() * entry.rows.element_size()
