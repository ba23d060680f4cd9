"""A draft model for speculative decoding (`--speculative draft --draft-model-path PATH`).

A small llama.cpp model of the target's vocabulary proposes a sequence's next tokens greedily;
the engine verifies them in its batched step exactly as it verifies n-gram drafts (engine.py's
`_verify`: a draft token is kept while it equals the token the target sampled at its place), so
answers are those of the target alone, greedy and seeded alike.

The draft model has a context of its own with one sequence: drafts are made only while one
sequence generates (engine.py's `_drafts`). Its KV cache follows the sequence it drafts for:
each call compares the cells it holds with the sequence's tokens (prompt, accepted tokens, the
target's own token of the last step), removes the cells past their common prefix (the rejected
draft tokens, or another sequence's text) and reads what is missing before it drafts. A new
sequence thus costs the draft model one read of its prompt (a shared prefix, as a system prompt,
is kept).

A draft model whose vocabulary is not the target's would propose ids that mean other text; it
is refused at load (`incompatibility`, the checks of llama.cpp's own server: vocabulary type,
BOS/EOS and whether they are added, sizes within 128, the same text for every token id both
have from 5 on).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

from llmrelay.worker.engines.base import EngineError

log = logging.getLogger("llmrelay.worker")

BATCH = 512  # rows per llama_decode when reading a prompt
MAX_SIZE_DIFFERENCE = 128  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
CHECK_FROM = 5  # llama.cpp's SPEC_VOCAB_CHECK_START_TOKEN_ID: ids below may be special


def incompatibility(target: Any, draft: Any) -> str | None:
    """Why the draft vocabulary (a llama_vocab pointer) cannot stand for the target's, if it
    cannot: llama.cpp's server's checks (common_speculative_are_compatible)."""
    v = llama_cpp
    if v.llama_vocab_type(target) != v.llama_vocab_type(draft):
        return "their tokenizers are of different types"
    for what, fn in (("BOS token", v.llama_vocab_bos), ("EOS token", v.llama_vocab_eos),
                     ("adding BOS", v.llama_vocab_get_add_bos),
                     ("adding EOS", v.llama_vocab_get_add_eos)):
        a, b = fn(target), fn(draft)
        if a != b:
            return f"their {what} differs ({a} against {b})"
    n_t, n_d = v.llama_vocab_n_tokens(target), v.llama_vocab_n_tokens(draft)
    if abs(n_t - n_d) > MAX_SIZE_DIFFERENCE:
        return f"their vocabularies have {n_t} and {n_d} tokens"
    for i in range(CHECK_FROM, min(n_t, n_d)):
        a, b = v.llama_vocab_get_text(target, i), v.llama_vocab_get_text(draft, i)
        if a != b:
            return (f"token {i} is {a.decode('utf-8', 'replace')!r} in one and "
                    f"{b.decode('utf-8', 'replace')!r} in the other")
    return None


class DraftModel:
    """The draft model: its weights, a one-sequence context and the tokens its cells hold."""

    def __init__(self, path: Path, target: Llama, target_path: Path, n_ctx: int, n_threads: int,
                 gpu: bool) -> None:
        self.path = path
        try:
            self.llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=n_threads,
                             n_gpu_layers=-1 if gpu else 0, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(f"llama.cpp could not load the draft model {path}: {e}") from e
        self.vocab = self.llm._model.vocab
        wrong = incompatibility(target._model.vocab, self.vocab)
        if wrong:
            self.llm.close()
            raise EngineError(
                f"--draft-model-path: the draft model {path.name} cannot draft for the model "
                f"{target_path.name}: {wrong}. A draft model must have the target's vocabulary "
                "(a smaller model of the same family)")
        self.n_vocab = self.llm.n_vocab()
        self.known = min(self.n_vocab, target.n_vocab())  # ids the target has
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_seq_max = 1
        params.n_batch = BATCH
        params.n_ubatch = BATCH
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not self.ctx:
            self.llm.close()
            raise EngineError(f"could not create a context of {n_ctx} tokens for the draft "
                              f"model {path.name}")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self.cached: list[int] = []  # what the cells hold, in order
        self.read = 0  # rows the last call read before drafting (the engine resets it)
        self._last = 0  # the batch row whose logits give the next token

    def draft(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that the draft model writes after `tokens`, greedily."""
        limit = min(limit, self.n_ctx - len(tokens))
        if limit <= 0 or not tokens:
            return []
        keep = 0
        for a, b in zip(self.cached, tokens[:-1], strict=False):  # the last: read again
            if a != b:
                break
            keep += 1
        try:
            if not llama_cpp.llama_memory_seq_rm(self.mem, 0, keep, -1):
                llama_cpp.llama_memory_seq_rm(self.mem, 0, -1, -1)
                keep = 0
            del self.cached[keep:]
            self.read += len(tokens) - keep
            self._decode(tokens[keep:])
            out: list[int] = []
            while True:
                ptr = llama_cpp.llama_get_logits_ith(self.ctx, self._last)
                token = int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())
                if token >= self.known:
                    break
                out.append(token)
                if len(out) >= limit or llama_cpp.llama_vocab_is_eog(self.vocab, token):
                    break
                self._decode([token])
            return out
        except RuntimeError as e:  # drafting is an optimisation: the step goes on without
            log.warning("the draft model failed (%s); its cache is cleared", e)
            llama_cpp.llama_memory_seq_rm(self.mem, 0, -1, -1)
            self.cached = []
            return []

    def _decode(self, tokens: list[int]) -> None:
        """Read `tokens` after the cached ones, in batches; logits for the last only."""
        b = self.batch
        for start in range(0, len(tokens), BATCH):
            chunk = tokens[start:start + BATCH]
            pos = len(self.cached)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = i == len(chunk) - 1
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.cached += chunk
            self._last = len(chunk) - 1

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        self.llm.close()


class DraftProposer:
    """A `speculate.Proposer`: the draft model's greedy continuation of one sequence."""

    def __init__(self, model: DraftModel, history: list[int]) -> None:
        self.model = model
        self.tokens = list(history)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def lookup(self, limit: int) -> list[int]:
        return self.model.draft(self.tokens, limit)
