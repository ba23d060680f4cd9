"""The llama.cpp engine: GGUF models through llama-cpp-python (the bundled default).

One `Llama` context serves one generation at a time (a lock); the worker's concurrency limit
queues the rest. The context keeps the KV cache of the previous request, so the next turn of a
conversation re-evaluates only its new suffix. Sampling is llama.cpp's own; logprobs are read
from the logits of the step that produced each token.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

from llmrelay.worker import templates
from llmrelay.worker.engines.base import (
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    StopMatcher,
    TokenLogprob,
)

log = logging.getLogger("llmrelay.worker")

DEFAULT_MAX_CONTEXT = 8192


def gpu_available() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaCppEngine(Engine):
    name = "llamacpp"

    def __init__(
        self,
        path: Path,
        *,
        device: str = "cpu",
        context_length: int | None = None,
        n_threads: int | None = None,
        chat_template: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.path = path
        self.default_seed = seed
        self.lock = threading.Lock()
        n_threads = n_threads or os.cpu_count() or 1
        try:
            self.llm = self._load(path, context_length or DEFAULT_MAX_CONTEXT, n_threads, device)
            trained = self.llm._model.n_ctx_train()
            if context_length is None and 0 < trained < self.llm.n_ctx():
                self.llm.close()  # a model trained on a shorter context: use its own
                self.llm = self._load(path, trained, n_threads, device)
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(f"llama.cpp could not load {path}: {e}") from e
        md = self.llm.metadata
        self.architecture = md.get("general.architecture", "")
        self.vocab = self.llm._model.vocab
        bos = self.llm.token_bos()
        eos = self.llm.token_eos()
        self.bos_id = bos
        self.chat_template = templates.choose(
            own=md.get("tokenizer.chat_template"),
            requested=chat_template,
            architecture=self.architecture,
            bos_token=self._piece(bos) if bos >= 0 else "",
            eos_token=self._piece(eos) if eos >= 0 else "",
        )
        log.info(
            "loaded %s (%s, context %d, %d threads, chat template: %s)",
            path.name,
            self.architecture or "unknown architecture",
            self.llm.n_ctx(),
            n_threads,
            self.chat_template.name,
        )

    @staticmethod
    def _load(path: Path, n_ctx: int, n_threads: int, device: str) -> Llama:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=-1 if device == "cuda" else 0,
            verbose=False,
        )

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def context_length(self) -> int:
        return int(self.llm.n_ctx())

    def tokenize(self, text: str) -> list[int]:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        # A template that writes the BOS text itself plus the tokenizer's own BOS gives two.
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self.bos_id:
            tokens = tokens[1:]
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _prompt_tokens(self, req: GenerationRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            n_vocab = self.llm.n_vocab()
            bad = [t for t in req.prompt_token_ids if not 0 <= t < n_vocab]
            if bad:
                raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})",
                                  40302)
            return list(req.prompt_token_ids)
        if req.messages is not None:
            return self.tokenize(self.render_chat(req.messages))
        return self.tokenize(req.prompt or "")

    def generate(self, req: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        tokens = self._prompt_tokens(req)
        n_prompt = len(tokens)
        n_ctx = self.context_length()
        if n_prompt == 0:
            raise EngineError("the prompt is empty", 40302)
        if n_prompt >= n_ctx:
            raise EngineError(
                f"This model's maximum context length is {n_ctx} tokens. However, your prompt "
                f"has {n_prompt} tokens. Please shorten it.",
                40303,
            )
        room = n_ctx - n_prompt
        max_new = room if req.max_new_tokens is None else min(req.max_new_tokens, room)
        stops = StopMatcher(list(req.stop))
        stop_ids = set(req.stop_token_ids)
        temperature = 0.0 if req.temperature < 1e-5 else req.temperature
        seed = req.seed if req.seed is not None else self.default_seed
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        with self.lock:
            self.llm.set_seed(seed if seed is not None else random.getrandbits(32))
            if req.echo:
                prompt_text = self.llm.detokenize(tokens, special=True).decode("utf-8", "replace")
                yield Chunk(prompt_text, n_prompt, 0)
            gen = self.llm.generate(
                tokens,
                top_k=req.top_k if req.top_k > 0 else 0,
                top_p=req.top_p,
                min_p=0.0,
                typical_p=1.0,
                temp=temperature,
                repeat_penalty=req.repetition_penalty,
                frequency_penalty=req.frequency_penalty,
                presence_penalty=req.presence_penalty,
                reset=True,
            )
            generated: list[int] = []
            finish = "length"
            stop_hit = False
            pending: list[TokenLogprob] = []
            try:
                for token in gen:
                    if cancel.is_set():
                        finish = "abort"
                        break
                    if llama_cpp.llama_vocab_is_eog(self.vocab, token) or token in stop_ids:
                        finish = "stop"
                        break
                    lp = self._logprob(token, req.logprobs) if req.logprobs is not None else None
                    piece = self.llm.detokenize([token], prev_tokens=tokens + generated)
                    generated.append(token)
                    text, hit = stops.feed(decoder.decode(piece))
                    if lp is not None:
                        pending.append(lp)
                    if hit:
                        finish, stop_hit = "stop", True
                        yield Chunk(text, n_prompt, len(generated), None, pending)
                        pending = []
                        break
                    if text or pending:
                        yield Chunk(text, n_prompt, len(generated), None, pending)
                        pending = []
                    if len(generated) >= max_new:
                        break
            finally:
                gen.close()
            tail = ""
            if not stop_hit:  # release text held back as a possible stop string, and partial UTF-8
                tail, _ = stops.feed(decoder.decode(b"", final=True))
                tail += stops.flush()
            yield Chunk(tail, n_prompt, len(generated), finish, pending)

    def _logprob(self, token: int, k: int) -> TokenLogprob:
        """Log-probability of `token` and the top `k` alternatives, from the current logits."""
        n_vocab = self.llm.n_vocab()
        ptr = self.llm._ctx.get_logits_ith(-1)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
        m = logits.max()
        logz = m + np.log(np.exp(logits - m).sum())
        lps = logits - logz
        top: list[tuple[str, float]] = []
        if k > 0:
            idx = np.argpartition(-lps, k)[:k]
            idx = idx[np.argsort(-lps[idx])]
            top = [(self._piece(int(i)), float(lps[i])) for i in idx]
        piece = self.llm.detokenize([token], special=True)
        return TokenLogprob(
            token=piece.decode("utf-8", errors="replace"),
            logprob=float(lps[token]),
            bytes=list(piece),
            top=top,
        )

    def info(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "chat_template": self.chat_template.name}

    def close(self) -> None:
        self.llm.close()
