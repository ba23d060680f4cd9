"""The llama.cpp engine: GGUF models through llama-cpp-python (the bundled default).

Continuous batching: one llama.cpp context holds `parallel` sequences (one per request being
generated), and a single scheduler thread owns it. Each step it builds one `llama_batch` with
the next token of every generating sequence plus a chunk of any prompt still being evaluated,
runs one `llama_decode`, and samples every sequence from its own logits with its own llama.cpp
sampler chain (temperature, top_p, top_k, penalties, seed). Requests join and leave between
steps. `start()` only submits a request; the scheduler hands its chunks to the request's `emit`
callback (in the worker: straight to the event loop, no thread per request).

The KV cache has `context_length` cells per slot. By default each sequence has a stream of its
own (llama.cpp's non-unified cache, `--kv-cache per-sequence`): a sequence attends only over
its own cells, so a greedy request gives the same text alone and inside any batch, and cached
prompts of idle slots cost nothing. With streams, llama.cpp computes together only sequences
whose ids follow each other in the batch, so each step writes its tokens in sequence-id order.
`--kv-cache unified` makes it one pool for all sequences: every step then attends over every
cell in use (a lone request slowed by ~30% with 8 slots of ~1,500 cached tokens each), and a
sequence's numbers depend on its neighbours, so greedy answers can differ between alone and
batched. See docs/benchmarks.md.

A finished request leaves its tokens in its slot; the next request whose prompt shares a prefix
of at least MIN_PREFIX_REUSE tokens with them (the next turn of a conversation) takes that slot
and evaluates only the new suffix. Other requests take a free slot next to a busy one, which
keeps the busy slots' ids consecutive for llama.cpp's per-sequence streams.
A cancelled request's cells are freed at once, and any slot's cells past the shared prefix are
freed when a new request takes it.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

from llmrelay.worker import templates
from llmrelay.worker.engines.base import (
    Chunk,
    Emit,
    Engine,
    EngineError,
    GenerationRequest,
    StopMatcher,
    TokenLogprob,
)

log = logging.getLogger("llmrelay.worker")

DEFAULT_MAX_CONTEXT = 8192
DEFAULT_PARALLEL = 8
MAX_PARALLEL = 64
KV_CACHE_LAYOUTS = ("per-sequence", "unified")  # --kv-cache
BATCH_TOKENS = 512  # tokens per llama_decode step (prompt chunks + one per generating sequence)
# A cached prefix shorter than this (a chat template's header, a short system prompt) does not
# decide the slot: keeping the busy slots' ids together does (see _pick_slot).
MIN_PREFIX_REUSE = 64
PENALTY_LAST_N = 64  # llama.cpp's default window for repetition/frequency/presence penalties


def gpu_available() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Slot:
    """One sequence id of the context and the tokens its KV cells hold."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


@dataclass
class _Seq:
    """One request inside the scheduler."""

    req: GenerationRequest
    tokens: list[int]  # the prompt
    max_new: int
    cancel: threading.Event
    emit: Emit
    slot: _Slot | None = None
    n_past: int = 0  # prompt tokens already in the KV cache
    next_token: int = -1  # sampled, not yet decoded
    generated: list[int] = field(default_factory=list)
    sampler: Any = None
    stops: StopMatcher | None = None
    decoder: Any = None
    pending: list[TokenLogprob] = field(default_factory=list)
    stop_ids: set[int] = field(default_factory=set)

    @property
    def gone(self) -> bool:
        return self.cancel.is_set()


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
        parallel: int | None = None,
        kv_cache: str = "per-sequence",
    ) -> None:
        if kv_cache not in KV_CACHE_LAYOUTS:
            raise EngineError(f"--kv-cache must be one of {', '.join(KV_CACHE_LAYOUTS)}, "
                              f"not {kv_cache!r}")
        self.path = path
        self.kv_cache = kv_cache
        self.default_seed = seed
        n_threads = n_threads or os.cpu_count() or 1
        self.parallel = max(1, min(parallel or DEFAULT_PARALLEL, MAX_PARALLEL))
        try:
            # The Llama object holds the model and tokenizer; its own context is a tiny unused one.
            self.llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=n_threads,
                             n_gpu_layers=-1 if device == "cuda" else 0, verbose=False)
            trained = self.llm._model.n_ctx_train()
            n_ctx = context_length or DEFAULT_MAX_CONTEXT
            if context_length is None and 0 < trained < n_ctx:
                n_ctx = trained  # a model trained on a shorter context: use its own
            self._n_ctx = n_ctx
            self.ctx = self._new_context(n_ctx, n_threads)
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(f"llama.cpp could not load {path}: {e}") from e
        md = self.llm.metadata
        self.architecture = md.get("general.architecture", "")
        self.vocab = self.llm._model.vocab
        self.n_vocab = self.llm.n_vocab()
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
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.slots = [_Slot(i) for i in range(self.parallel)]
        self.inbox: deque[_Seq] = deque()
        self.outbox: list[tuple[Emit, Chunk | Exception | None]] = []  # delivered once per step
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="llamacpp-scheduler", daemon=True)
        self.thread.start()
        log.info(
            "loaded %s (%s, context %d per sequence, %d sequences batched, %s KV cache, "
            "%d threads, chat template: %s)",
            path.name, self.architecture or "unknown architecture", self._n_ctx, self.parallel,
            self.kv_cache, n_threads, self.chat_template.name,
        )

    def _new_context(self, n_ctx: int, n_threads: int) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * self.parallel  # split per sequence: n_ctx cells each
        params.n_seq_max = self.parallel
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = self.kv_cache == "unified"
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not ctx:
            raise RuntimeError(f"could not create a context of {n_ctx} x {self.parallel} tokens")
        per_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        if per_seq < n_ctx:
            log.warning("llama.cpp gave %d cells per sequence (asked %d)", per_seq, n_ctx)
            self._n_ctx = per_seq
        return ctx

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def context_length(self) -> int:
        return int(self._n_ctx)

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
            bad = [t for t in req.prompt_token_ids if not 0 <= t < self.n_vocab]
            if bad:
                raise EngineError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})", 40302)
            return list(req.prompt_token_ids)
        if req.messages is not None:
            return self.tokenize(self.render_chat(req.messages))
        return self.tokenize(req.prompt or "")

    # ---- the caller's side -------------------------------------------------------------------

    def generate(self, req: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        return self.generate_from_start(req, cancel)

    def start(self, req: GenerationRequest, cancel: threading.Event, emit: Emit) -> None:
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
        with self.cond:
            if self.closed:
                raise EngineError("the engine is shutting down", 50001)
        if req.echo:
            prompt_text = self.llm.detokenize(tokens, special=True).decode("utf-8", "replace")
            emit(Chunk(prompt_text, n_prompt, 0))
        if max_new <= 0:
            emit(Chunk("", n_prompt, 0, "length"))
            emit(None)
            return
        seq = _Seq(req=req, tokens=tokens, max_new=max_new, cancel=cancel, emit=emit)
        with self.cond:
            if self.closed:
                emit(EngineError("the engine is shutting down", 50001))
                return
            self.inbox.append(seq)
            self.cond.notify()

    # ---- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Seq] = []
        while True:
            self._deliver()
            with self.cond:
                while not self.closed and not active and not self.inbox:
                    self.cond.wait()
                if self.closed:
                    break
                self._admit(active)
            for seq in [s for s in active if s.gone]:
                self._finish(seq, "abort", active)
            if not active:
                continue
            try:
                self._step(active)
            except Exception as e:  # a failed step fails its requests, never the thread
                log.exception("llama.cpp step failed")
                for seq in list(active):
                    self._release(seq, active, keep_cache=False)
                    self._post(seq, EngineError(f"llama.cpp failed: {e}", 50001))
        for seq in active + list(self.inbox):
            self._post(seq, EngineError("the engine is shutting down", 50001))
        self._deliver()

    def _post(self, seq: _Seq, item: Chunk | Exception | None) -> None:
        self.outbox.append((seq.emit, item))

    def _end(self, seq: _Seq, chunk: Chunk) -> None:
        self._post(seq, chunk)
        self._post(seq, None)

    def _deliver(self) -> None:
        """Hand the step's chunks over together, after its Python work and before the next
        llama_decode (which releases the GIL): the readers wake once per step, while llama.cpp
        computes, instead of once per chunk and competing for the GIL with the sampling."""
        out, self.outbox = self.outbox, []
        for emit, item in out:
            try:
                emit(item)
            except Exception:  # a reader's callback failing must not stop the scheduler
                log.exception("delivering a chunk failed")

    def _admit(self, active: list[_Seq]) -> None:
        """Move waiting requests into free slots (called with the condition held)."""
        for seq in [s for s in self.inbox if s.gone]:
            self.inbox.remove(seq)
            self._end(seq, Chunk("", len(seq.tokens), 0, "abort"))
        while self.inbox:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            seq = self.inbox.popleft()
            slot = self._pick_slot(free, seq.tokens)
            n_keep = min(common_prefix(slot.cached, seq.tokens), len(seq.tokens) - 1)
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, n_keep, -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                n_keep = 0
            log.debug("request %s: slot %d, %d of %d prompt tokens cached", seq.req.request_id,
                      slot.seq_id, n_keep, len(seq.tokens))
            slot.cached = seq.tokens[:n_keep]
            slot.busy = True
            seq.slot = slot
            seq.n_past = n_keep
            self._prepare(seq)
            active.append(seq)

    def _pick_slot(self, free: list[_Slot], tokens: list[int]) -> _Slot:
        """The free slot whose cached tokens share the longest prefix with the prompt (at least
        MIN_PREFIX_REUSE tokens: the next turn of a conversation); else one next to a busy slot,
        so the busy slots' sequence ids stay consecutive (llama.cpp decodes a run of consecutive
        ids in one pass, and each gap costs a pass); then the least recently used, so cached
        conversations last as long as they can."""
        busy = {s.seq_id for s in self.slots if s.busy}

        def key(s: _Slot) -> tuple[int, bool, float]:
            shared = common_prefix(s.cached, tokens)
            return (shared if shared >= MIN_PREFIX_REUSE else 0,
                    s.seq_id - 1 in busy or s.seq_id + 1 in busy, -s.last_used)

        return max(free, key=key)

    def _prepare(self, seq: _Seq) -> None:
        req = seq.req
        seed = req.seed if req.seed is not None else self.default_seed
        if seed is None:
            seed = random.getrandbits(32)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if (req.repetition_penalty != 1.0 or req.frequency_penalty != 0.0
                or req.presence_penalty != 0.0):
            add(chain, llama_cpp.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, req.repetition_penalty, req.frequency_penalty,
                req.presence_penalty))
        if req.temperature < 1e-5:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if req.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(req.top_k))
            if req.top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(req.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(req.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for t in seq.tokens[-PENALTY_LAST_N:]:  # penalties see the end of the prompt
            llama_cpp.llama_sampler_accept(chain, t)
        seq.sampler = chain
        seq.stops = StopMatcher(list(req.stop))
        seq.stop_ids = set(req.stop_token_ids)
        seq.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _step(self, active: list[_Seq]) -> None:
        """One llama_decode over every active sequence, then one token sampled for each."""
        b = self.batch
        n = 0
        outputs: list[tuple[_Seq, int]] = []

        def put(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            b.token[n] = token
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq_id
            b.logits[n] = logits
            n += 1

        # Every generating sequence gets its next token; prompts share what is left of the batch,
        # in arrival order.
        budget = BATCH_TOKENS - sum(1 for s in active if s.n_past >= len(s.tokens))
        takes: dict[int, int] = {}
        for seq in active:
            if seq.n_past < len(seq.tokens) and budget > 0:
                takes[id(seq)] = min(budget, len(seq.tokens) - seq.n_past)
                budget -= takes[id(seq)]
        # The batch is written in sequence-id order: with a KV stream per sequence, llama.cpp
        # computes together only sequences whose ids follow each other in the batch (one
        # sub-batch per run of consecutive ids); in arrival order, 8 sequences could take up to
        # 8 passes (benchmarks/bench_batch_order.py: 140 against 253 tokens/s).
        for seq in sorted(active, key=lambda s: s.slot.seq_id if s.slot else 0):
            assert seq.slot is not None
            if seq.n_past >= len(seq.tokens):
                pos = len(seq.tokens) + len(seq.generated) - 1
                outputs.append((seq, n))
                put(seq.next_token, pos, seq.slot.seq_id, True)
                continue
            take = takes.get(id(seq), 0)
            for i in range(seq.n_past, seq.n_past + take):
                last = i == len(seq.tokens) - 1
                if last:
                    outputs.append((seq, n))
                put(seq.tokens[i], i, seq.slot.seq_id, last)
            seq.n_past += take
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for seq, idx in outputs:
            assert seq.slot is not None
            if seq.generated:
                seq.slot.cached.append(seq.next_token)
            else:
                seq.slot.cached = list(seq.tokens)
            token = llama_cpp.llama_sampler_sample(seq.sampler, self.ctx, idx)
            self._take(seq, token, idx, active)

    def _take(self, seq: _Seq, token: int, idx: int, active: list[_Seq]) -> None:
        """Handle one sampled token of `seq`: emit text, or finish."""
        n_prompt = len(seq.tokens)
        if seq.gone:
            self._finish(seq, "abort", active)
            return
        if llama_cpp.llama_vocab_is_eog(self.vocab, token) or token in seq.stop_ids:
            self._finish(seq, "stop", active)
            return
        assert seq.stops is not None
        if seq.req.logprobs is not None:
            seq.pending.append(self._logprob(token, idx, seq.req.logprobs))
        piece = self.llm.detokenize([token])
        seq.generated.append(token)
        seq.next_token = token
        text, hit = seq.stops.feed(seq.decoder.decode(piece))
        if hit:
            self._post(seq, Chunk(text, n_prompt, len(seq.generated), None, seq.pending))
            seq.pending = []
            self._finish(seq, "stop", active, stop_hit=True)
            return
        if text or seq.pending:
            self._post(seq, Chunk(text, n_prompt, len(seq.generated), None, seq.pending))
            seq.pending = []
        if len(seq.generated) >= seq.max_new:
            self._finish(seq, "length", active)

    def _finish(self, seq: _Seq, reason: str, active: list[_Seq], stop_hit: bool = False) -> None:
        tail = ""
        if not stop_hit and seq.stops is not None:
            # release text held back as a possible stop string, and partial UTF-8
            tail, _ = seq.stops.feed(seq.decoder.decode(b"", final=True))
            tail += seq.stops.flush()
        self._release(seq, active, keep_cache=reason != "abort")
        self._end(seq, Chunk(tail, len(seq.tokens), len(seq.generated), reason, seq.pending))
        seq.pending = []

    def _release(self, seq: _Seq, active: list[_Seq], keep_cache: bool) -> None:
        if seq in active:
            active.remove(seq)
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        slot = seq.slot
        if slot is not None:
            if not keep_cache:
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                slot.cached = []
            slot.busy = False
            slot.last_used = time.monotonic()
            seq.slot = None

    def _logprob(self, token: int, idx: int, k: int) -> TokenLogprob:
        """Log-probability of `token` and the top `k` alternatives, from the step's logits."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        logz = m + np.log(np.exp(logits - m).sum())
        lps = logits - logz
        top: list[tuple[str, float]] = []
        if k > 0:
            idx_top = np.argpartition(-lps, k)[:k]
            idx_top = idx_top[np.argsort(-lps[idx_top])]
            top = [(self._piece(int(i)), float(lps[i])) for i in idx_top]
        piece = self.llm.detokenize([token], special=True)
        return TokenLogprob(
            token=piece.decode("utf-8", errors="replace"),
            logprob=float(lps[token]),
            bytes=list(piece),
            top=top,
        )

    def info(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "chat_template": self.chat_template.name,
                "parallel": self.parallel}

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
        self.llm.close()

