"""The transformers engine's sentence-embedding models (e.g. the bundled all-MiniLM-L6-v2): the
mean of the last hidden states over the real tokens, L2-normed. The model runs off the event
loop (asyncio.to_thread); such a model serves /v1/embeddings only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from llmrelay.protocol import ErrorCode, Features
from llmrelay.worker.engines.base import Chunk, Engine, EngineError, GenerationRequest
from llmrelay.worker.engines.hf.options import Options, check_memory, load_error, torch_dtype

log = logging.getLogger("llmrelay.worker")


class EmbeddingEngine(Engine):
    """A sentence-embedding model: mean of the last hidden states over real tokens, L2-normed."""

    name = "transformers"
    BATCH = 32

    def __init__(self, options: Options, device: str) -> None:
        path = options.path
        self.path, self.device = path, device
        self.truncate = options.embed_truncate
        if options.load_4bit or options.load_8bit:
            log.warning("--load-8bit/--load-4bit ignored for an embedding model")
        dtype = torch_dtype(options.dtype, "float32")
        # The weights as they load here: no quantization, on one device.
        plain = dataclasses.replace(options, load_8bit=False, load_4bit=False, num_gpus=None,
                                    max_gpu_memory=None)
        check_memory(path, device, plain, dtype.itemsize)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError, RuntimeError, KeyError, ImportError, TypeError) as e:
            raise load_error(path, e) from e
        limit = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)
        st = path / "sentence_bert_config.json"
        if st.exists():
            limit = min(limit, int(json.loads(st.read_text()).get("max_seq_length", limit)))
        self._n_ctx = limit
        self.dim = int(self.model.config.hidden_size)
        log.info("loaded embedding model %s (%d dimensions, up to %d tokens per input, on %s)",
                 path.name, self.dim, self._n_ctx, device)

    def context_length(self) -> int:
        return self._n_ctx

    def features(self) -> Features:
        return Features(chat=False, completions=False, embeddings=True,
                        embedding_dimensions=[self.dim], tokenize=True)

    async def count_tokens(self, text: str) -> int:
        return len(await asyncio.to_thread(lambda: self.tokenizer(text)["input_ids"]))

    async def prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            self.render_chat(req.messages)  # refuses: no chat template
        return await asyncio.to_thread(lambda: list(self.tokenizer(req.prompt or "")["input_ids"]))

    async def text_of(self, tokens: list[int]) -> str:
        bad = [t for t in tokens if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary "
                              f"(0..{self.tokenizer.vocab_size - 1})", ErrorCode.PARAM_OUT_OF_RANGE)
        return str(await asyncio.to_thread(self.tokenizer.decode, tokens))

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    variables: dict[str, Any] | None = None) -> str:
        raise EngineError("this is an embedding model; use /v1/embeddings",
                          ErrorCode.VALIDATION_TYPE_ERROR)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        raise EngineError("this is an embedding model: it serves /v1/embeddings only",
                          ErrorCode.VALIDATION_TYPE_ERROR)
        yield  # an async generator

    async def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        return await asyncio.to_thread(self._embed, inputs)

    def _ids(self, item: str | list[int], i: int) -> list[int]:
        if isinstance(item, str):
            ids = list(self.tokenizer(item)["input_ids"])
        else:
            bad = [t for t in item if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise EngineError(f"input[{i}]: token id {bad[0]} is outside the vocabulary "
                                  f"(0..{self.tokenizer.vocab_size - 1})",
                                  ErrorCode.PARAM_OUT_OF_RANGE)
            ids = list(item)
        if not ids:
            raise EngineError(f"input[{i}] is empty", ErrorCode.PARAM_OUT_OF_RANGE)
        if len(ids) > self._n_ctx:
            if not self.truncate:
                raise EngineError(
                    f"input[{i}] has {len(ids)} tokens; this model takes at most {self._n_ctx} "
                    "(start the worker with --embed-in-truncate to cut longer inputs)",
                    ErrorCode.CONTEXT_OVERFLOW)
            ids = ids[: self._n_ctx]
        return ids

    @torch.inference_mode()
    def _embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        rows = [self._ids(t, i) for i, t in enumerate(inputs)]
        pad = self.tokenizer.pad_token_id or 0
        out: list[list[float]] = []
        for start in range(0, len(rows), self.BATCH):
            part = rows[start:start + self.BATCH]
            width = max(len(r) for r in part)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in part], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in part],
                                device=self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            out.extend(pooled.cpu().tolist())
        return out, sum(len(r) for r in rows)
