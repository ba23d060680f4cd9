"""The llama.cpp engine: GGUF models through llama-cpp-python (the bundled default).

Continuous batching: one llama.cpp context holds `parallel` sequences (one per request being
generated), and a single scheduler thread owns it. Each step it builds one `llama_batch` with
the next token of every generating sequence plus a chunk of any prompt still being evaluated,
runs one `llama_decode`, and samples every sequence from its own logits with its own llama.cpp
sampler chain (temperature, top_p, top_k, penalties, seed). Requests join and leave between
steps. While sequences are generating, a prompt gets only as many rows per step as keep the
step within about twice the time of their tokens alone, as measured (`prefill.PrefillBudget`:
chunked prefill with a time budget), so a long prompt no longer stalls every running stream for
seconds; with nothing generating it takes the whole batch. What every threaded engine shares
(prompt rules, stop handling, the hand-off of chunks to the event loop) is
`threaded.ThreadedEngine`'s; this module is the llama.cpp side.

With a vision model's projector (`--mmproj`: vision.py) a chat prompt with images is tokenized
by llama.cpp's mtmd; each image is evaluated into its sequence's cells between steps (not in
the batch), the text around it in the steps; its positions hold ids made from the image's
content, so a slot's cached prefix is reused only by the same image.

The KV cache has `context_length` cells per slot. By default each sequence has a stream of its
own (llama.cpp's non-unified cache, `--kv-cache per-sequence`): a sequence attends only over
its own cells, so a greedy request gives the same text alone and inside any batch (a prompt
longer than EXACT_ROWS tokens only as far as "Same numbers" below allows), and cached
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

Same numbers however a prompt was split. llama.cpp's CPU attention computes a cell a little
differently when its sequence had more than about 48 rows in the step (flash attention's tiled
path): the cells of a long prompt evaluated in one piece differ from the same cells evaluated in
other pieces, and a short request that reused the first cells of a slot that had held a long
prompt answered differently from the same request on a fresh slot (seeded and greedy answers
changed with the worker's history). Cells computed in steps of at most EXACT_ROWS rows of their
sequence hold the same numbers whatever the split; each slot counts how many of its first cells
are such (`_Slot.exact`), and a prefix shorter than MIN_PREFIX_REUSE is reused only that far, so a
short prompt gives the same answer on any slot, alone or batched. A longer shared prefix (a
conversation) is reused whole: recomputing it would cost more than the last bits are worth. A
prompt of more than EXACT_ROWS tokens is evaluated in large steps (splitting every prompt into
steps that small costs about a third of the prompt speed), so its answer can still differ a
little with what the slot held and what shared the step, as in llama.cpp's own server
(`cache_prompt`) and vLLM without batch invariance.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

from llmrelay.protocol import Features, LogprobEntry, logprob_entry
from llmrelay.worker import templates
from llmrelay.worker.engines.base import EngineError, GenerationRequest, images_of
from llmrelay.worker.engines.guidance import Guide
from llmrelay.worker.engines.llamacpp import sampling
from llmrelay.worker.engines.llamacpp.draft import DraftModel, DraftProposer
from llmrelay.worker.engines.llamacpp.options import KV_CACHE_LAYOUTS, Options
from llmrelay.worker.engines.llamacpp.prefill import PrefillBudget
from llmrelay.worker.engines.llamacpp.speculate import RowCost, Speculator
from llmrelay.worker.engines.llamacpp.vision import Projector, Prompt, marked
from llmrelay.worker.engines.threaded import Generation, Mailbox, ThreadedEngine

log = logging.getLogger("llmrelay.worker")

DEFAULT_MAX_CONTEXT = 8192
DEFAULT_PARALLEL = 8
MAX_PARALLEL = 64
BATCH_TOKENS = 512  # tokens per llama_decode step (prompt chunks + one per generating sequence)
# A cached prefix shorter than this (a chat template's header, a short system prompt) does not
# decide the slot: keeping the busy slots' ids together does (see _pick_slot).
MIN_PREFIX_REUSE = 64
# A sequence's rows in one step up to this many: its cells hold the same numbers however its
# prompt was split (measured with llama-cpp-python 0.3.36: 48 rows do, 64 do not; see the
# module docstring and tests/test_batching.py).
EXACT_ROWS = 48


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
    exact: int = 0  # the first cells of `cached` computed in steps of at most EXACT_ROWS rows
    busy: bool = False
    last_used: float = 0.0

    def computing(self, start: int, count: int) -> None:
        """`count` cells from `start` go into this step: still exact if few enough."""
        if count <= EXACT_ROWS and self.exact == start:
            self.exact = start + count


class _Seq(Generation):
    """A request inside the scheduler: its slot, its place in the prompt, its sampler chain."""

    def __init__(self, req: GenerationRequest, mailbox: Mailbox) -> None:
        super().__init__(req, mailbox)
        self.slot: _Slot | None = None
        self.n_past = 0  # prompt tokens already in the KV cache
        self.next_token = -1  # sampled, not yet decoded
        self.sampler: Any = None
        self.guide: Guide | None = None  # its constraint's matcher, if any
        self.speculator: Speculator | None = None  # its drafts (--speculative ngram|draft)
        self.prompt: Prompt | None = None  # a prompt with images: its mtmd chunks (vision.py)


class LlamaCppEngine(ThreadedEngine):
    name = "llamacpp"
    generation_class = _Seq

    def __init__(self, options: Options) -> None:
        super().__init__()
        path, kv_cache = options.path, options.kv_cache
        if kv_cache not in KV_CACHE_LAYOUTS:
            raise EngineError(f"--kv-cache must be one of {', '.join(KV_CACHE_LAYOUTS)}, "
                              f"not {kv_cache!r}")
        context_length, chat_template = options.context_length, options.chat_template
        self.path = path
        self.kv_cache = kv_cache
        self.default_seed = options.seed
        n_threads = options.n_threads or os.cpu_count() or 1
        self.parallel = max(1, min(options.parallel or DEFAULT_PARALLEL, MAX_PARALLEL))
        try:
            # The Llama object holds the model and tokenizer; its own context is a tiny unused one.
            self.llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=n_threads,
                             n_gpu_layers=-1 if options.device == "cuda" else 0, verbose=False)
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
        self.grammars = sampling.grammars(self.vocab, self.n_vocab)
        self.candidates = sampling.Candidates(self.n_vocab)
        # prompt rows per step while others decode (--prefill-slowdown)
        self.prefill = PrefillBudget(BATCH_TOKENS, slowdown=options.prefill_slowdown)
        self.split_steps = 0  # steps whose prompt rows the time budget cut while others decoded
        self.speculation = options.speculation
        self.row_cost = RowCost()  # decode-only steps' time by rows: when a draft row pays
        self.drafted = [0, 0]  # draft tokens proposed, accepted (every request so far)
        self.reused = [0, 0]  # requests that reused a slot's cached prefix, and its tokens
        self.projector: Projector | None = None  # --mmproj: vision.py
        self.pending = threading.local()  # a prompt with images, from prompt_tokens to prepare
        self.draft_model: DraftModel | None = None  # --speculative draft: draft.py
        try:
            if options.mmproj is not None:
                self.projector = Projector(options.mmproj, self.llm._model.model, n_threads,
                                           options.device == "cuda")
                log.info("reads images with %s", options.mmproj.name)
            if self.speculation.mode == "draft" and self.speculation.draft_model is not None:
                self.draft_model = DraftModel(self.speculation.draft_model, self.llm, path,
                                              self._n_ctx, n_threads, options.device == "cuda")
        except EngineError:
            self._free_native()
            self.llm.close()
            raise
        self.thread = threading.Thread(target=self._run, name="llamacpp-scheduler", daemon=True)
        self.thread.start()
        log.info(
            "loaded %s (%s, context %d per sequence, %d sequences batched, %s KV cache, "
            "%d threads, chat template: %s, speculative decoding: %s)",
            path.name, self.architecture or "unknown architecture", self._n_ctx, self.parallel,
            self.kv_cache, n_threads, self.chat_template.name, self.speculation.mode
            + (f" with {self.draft_model.path.name}" if self.draft_model else ""),
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

    # ---- the model side of ThreadedEngine ----------------------------------------------------

    def context_length(self) -> int:
        return int(self._n_ctx)

    def features(self) -> Features:
        return Features(chat=True, completions=True, prompt_token_ids=True, logprobs=True,
                        top_logprobs=20, seed=True, penalties=True, tools=True, json_schema=True,
                        logit_bias=True, continuation=True, tokenize=True,
                        vision=self.projector is not None)

    def status(self) -> dict[str, Any]:
        hits, tokens = self.reused
        return {"ready": True, "grammars_compiled": self.grammars.compiled,
                "prefill": self.prefill_status(), "speculative": self.speculation_status(),
                "prefix_cache": {"enabled": True, "hits": hits, "tokens": tokens}}

    def speculation_status(self) -> dict[str, Any]:
        """--speculative and its draft tokens so far (speculate.py)."""
        proposed, accepted = self.drafted
        out: dict[str, Any] = {
            "mode": self.speculation.mode, "proposed": proposed, "accepted": accepted,
            "acceptance_rate": round(accepted / proposed, 4) if proposed else None}
        if self.draft_model is not None:
            out["draft_model"] = self.draft_model.path.name
        return out

    def prefill_status(self) -> dict[str, Any]:
        """The chunked-prefill budget as measured so far (see prefill.py)."""
        p = self.prefill

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000, 3)

        return {"split_steps": self.split_steps, "ms_per_decode_row": ms(p.per_decode_row),
                "ms_per_prompt_row": ms(p.per_prompt_row)}

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        # A template that writes the BOS text itself plus the tokenizer's own BOS gives two.
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self.bos_id:
            tokens = tokens[1:]
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        tokens = [t for t in tokens if t >= 0]  # (an image's ids are not text: vision.py)
        return self.llm.detokenize(tokens, special=True).decode("utf-8", "replace")

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    variables: dict[str, Any] | None = None) -> str:
        if self.projector is not None:
            messages = marked(messages)  # each image part as mtmd's marker, in its place
        return super().render_chat(messages, tools, variables)

    def prompt_tokens(self, req: GenerationRequest) -> list[int]:
        """A chat prompt with images is tokenized by mtmd (vision.py); its tokens hold the
        images' ids, its chunks wait for `prepare` (the same thread, see ThreadedEngine._admit)."""
        images = (images_of(req.messages) if self.projector is not None and req.messages
                  and req.prompt_token_ids is None else [])
        if not images:
            return super().prompt_tokens(req)
        assert self.projector is not None and req.messages is not None
        text = self.render_chat(req.messages, req.template_tools, req.template_kwargs)
        bos = self._piece(self.bos_id) if self.bos_id >= 0 else ""
        # (a template that writes the BOS text itself gets no second one, as in tokenize)
        prompt = self.projector.tokenize(text, images, add_special=not (bos and text.startswith(bos)))
        self._stash(prompt)
        return prompt.tokens

    def _stash(self, prompt: Prompt | None) -> None:
        old = getattr(self.pending, "prompt", None)
        if old is not None and old is not prompt:
            old.free()
        self.pending.prompt = prompt

    def vocab_size(self) -> int:
        return int(self.n_vocab)

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def piece(self, gen: Generation, token: int) -> bytes:
        # special tokens are written out only where they mark a reasoning model's channels
        thinking = gen.req.thinking
        return self.llm.detokenize([token], special=thinking is not None
                                   and thinking.format.special_markers)

    def prepare(self, gen: Generation) -> None:
        """Compile the request's constraint (cached per distinct constraint) into its own
        matcher; a schema llguidance cannot enforce is refused here, before the request is
        queued."""
        assert isinstance(gen, _Seq)
        if gen.req.constraint is not None:
            gen.guide = self.grammars.guide(gen.req.constraint)
        prompt = getattr(self.pending, "prompt", None)
        if prompt is not None and prompt.tokens is gen.tokens:
            self.pending.prompt = None
            gen.prompt = prompt

    def submit(self, gen: Generation) -> None:
        assert isinstance(gen, _Seq)
        self.inbox.append(gen)

    # ---- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Seq] = []
        while True:
            self.wake()  # the last step's chunks, after its Python work (see _step)
            with self.cond:
                while not self.closed and not active and not self.inbox:
                    self.cond.wait()
                if self.closed:
                    break
                self._admit_waiting(active)
            for seq in [s for s in active if s.gone]:
                self._end(seq, "abort", active)
            for seq in [s for s in active if s.prompt is not None]:
                self._read_images(seq, active)
            if not active:
                continue
            try:
                self._step(active)
            except Exception as e:  # a failed step fails its requests, never the thread
                log.exception("llama.cpp step failed")
                for seq in list(active):
                    self._release(seq, active, keep_cache=False)
                    self.fail(seq, EngineError(f"llama.cpp failed: {e}"))
        for seq in active + list(self.inbox):
            self.fail(seq, EngineError("the engine is shutting down"))
        self.wake()

    def _end(self, seq: _Seq, reason: str, active: list[_Seq], stop_hit: bool = False) -> None:
        self._release(seq, active, keep_cache=reason != "abort")
        self.finish(seq, reason, stop_hit)

    def _admit_waiting(self, active: list[_Seq]) -> None:
        """Move waiting requests into free slots (called with the condition held)."""
        for seq in [s for s in self.inbox if s.gone]:
            self.inbox.remove(seq)
            if seq.prompt is not None:
                seq.prompt.free()
            self.finish(seq, "abort")
        while self.inbox:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            seq = self.inbox.popleft()
            slot = self._pick_slot(free, seq.tokens)
            n_keep = min(common_prefix(slot.cached, seq.tokens), len(seq.tokens) - 1)
            if n_keep < MIN_PREFIX_REUSE:
                n_keep = min(n_keep, slot.exact)  # see "Same numbers" in the module docstring
            if seq.prompt is not None:
                n_keep = seq.prompt.reusable(n_keep)  # an image is evaluated whole
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, n_keep, -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                n_keep = 0
            if n_keep > 0:
                self.reused[0] += 1
                self.reused[1] += n_keep
            log.debug("request %s: slot %d, %d of %d prompt tokens cached", seq.req.request_id,
                      slot.seq_id, n_keep, len(seq.tokens))
            slot.cached = seq.tokens[:n_keep]
            slot.exact = min(slot.exact, n_keep)
            slot.busy = True
            seq.slot = slot
            seq.n_past = n_keep
            self._sampler(seq)
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

    def _sampler(self, seq: _Seq) -> None:
        req = seq.req
        seed = req.seed if req.seed is not None else self.default_seed
        history = seq.tokens if seq.prompt is None else [t for t in seq.tokens if t >= 0]
        seq.sampler = sampling.chain(req, self.n_vocab, seed, history)
        # Constrained and logprobs requests are never speculated on: their matcher and their
        # logprobs would have to follow draft tokens that may be rolled back.
        # Nor are prompts with images: their image ids are no tokens to look up or draft from.
        if self.speculation.on and seq.guide is None and req.logprobs is None and seq.prompt is None:
            seq.speculator = (Speculator(DraftProposer(self.draft_model, seq.tokens),
                                         self.speculation.tokens) if self.draft_model
                              else Speculator.of(self.speculation, seq.tokens))
            seq.drafted = [0, 0]

    def _step(self, active: list[_Seq]) -> None:
        """One llama_decode over every active sequence, then one token sampled for each (more
        for a sequence whose draft tokens the target agrees with: speculate.py)."""
        b = self.batch
        n = 0
        outputs: list[tuple[_Seq, int, list[int]]] = []

        def put(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            b.token[n] = token
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq_id
            b.logits[n] = logits
            n += 1

        # Every generating sequence gets its next token, and its draft tokens where they pay;
        # prompts share the rows the time budget allows (all that is left of the batch when
        # nothing decodes), in arrival order.
        started = time.perf_counter()
        decoding = sum(1 for s in active if s.n_past >= len(s.tokens))
        drafts = self._drafts(active, decoding)
        decode_rows = decoding + sum(len(d) for d in drafts.values())
        reading = [s for s in active if s.n_past < len(s.tokens)]
        takes = {id(s): n for s, n in zip(reading, self.prefill.split(
            decode_rows, [self._text_left(s) for s in reading]), strict=True) if n}
        prompt_rows = sum(takes.values())
        waiting = sum(self._text_left(s) for s in reading)
        if decoding and prompt_rows < min(waiting, BATCH_TOKENS - decode_rows):
            self.split_steps += 1  # the time budget, not the batch's size, cut the prompts
        # The batch is written in sequence-id order: with a KV stream per sequence, llama.cpp
        # computes together only sequences whose ids follow each other in the batch (one
        # sub-batch per run of consecutive ids); in arrival order, 8 sequences could take up to
        # 8 passes (benchmarks/bench_batch_order.py: 140 against 253 tokens/s).
        for seq in sorted(active, key=lambda s: s.slot.seq_id if s.slot else 0):
            assert seq.slot is not None
            if seq.n_past >= len(seq.tokens):
                pos = len(seq.tokens) + len(seq.generated) - 1
                draft = drafts.get(id(seq), [])
                outputs.append((seq, n, draft))
                put(seq.next_token, pos, seq.slot.seq_id, True)
                for i, t in enumerate(draft):
                    put(t, pos + 1 + i, seq.slot.seq_id, True)
                seq.slot.computing(pos, 1 + len(draft))
                continue
            take = takes.get(id(seq), 0)
            seq.slot.computing(seq.n_past, take)
            for i in range(seq.n_past, seq.n_past + take):
                last = i == len(seq.tokens) - 1
                if last:
                    outputs.append((seq, n, []))
                put(seq.tokens[i], i, seq.slot.seq_id, last)
            seq.n_past += take
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for seq, idx, draft in outputs:
            self._verify(seq, idx, draft, active)
        seconds = time.perf_counter() - started
        self.prefill.observe(decode_rows, prompt_rows, seconds)
        # (not a step in which the draft model read a prompt: a one-off, not a row's cost)
        if decoding and not prompt_rows and not (self.draft_model and self.draft_model.read > 2):
            self.row_cost.observe(decode_rows, seconds)

    def _text_left(self, seq: _Seq) -> int:
        """The prompt rows `seq` can take in a batched step: up to its next image, if any."""
        end = seq.prompt.text_until(seq.n_past) if seq.prompt is not None else len(seq.tokens)
        return end - seq.n_past

    def _read_images(self, seq: _Seq, active: list[_Seq]) -> None:
        """Evaluate the images that come next in `seq`'s prompt into its slot's cells, between
        the batched steps (mtmd decodes an image's embeddings for one sequence: vision.py)."""
        assert seq.prompt is not None and seq.slot is not None and self.projector is not None
        while seq.n_past < len(seq.tokens):
            span = seq.prompt.image_at(seq.n_past)
            if span is None:
                return
            seq.slot.computing(span.start, span.n)
            try:
                self.projector.evaluate(self.ctx, span, seq.slot.seq_id, BATCH_TOKENS)
            except RuntimeError as e:
                log.warning("request %s: %s", seq.req.request_id, e)
                self._release(seq, active, keep_cache=False)
                self.fail(seq, EngineError(f"llama.cpp failed: {e}"))
                return
            seq.n_past = span.end
            if span is seq.prompt.images[-1]:
                seq.prompt.free()  # every image read: its chunks are no longer needed

    def _drafts(self, active: list[_Seq], decoding: int) -> dict[int, list[int]]:
        """The draft tokens of this step's generating sequences (by id(seq)): only for those
        that speculate and are not writing forced tokens (with the per-sequence KV cache or a
        draft model, only while one sequence generates), within the batch, within EXACT_ROWS
        rows of their sequence (see "Same numbers") and within their length limit."""
        drafts: dict[int, list[int]] = {}
        if not self.speculation.on or not decoding:
            return drafts
        if self.draft_model is not None:
            self.draft_model.read = 0
            if decoding > 1:
                return drafts  # its context holds one sequence: it would read prompts by turns
        if decoding > 1 and self.kv_cache != "unified":
            # With a KV stream per sequence llama.cpp splits a step into sub-batches of as many
            # rows of each sequence: one sequence's d draft rows cost every sequence d more
            # passes (measured: 8 streams at half their speed). Drafts only for a lone stream.
            return drafts
        threshold = self.row_cost.threshold(decoding)
        room = BATCH_TOKENS - decoding - self.prefill.floor
        for seq in active:
            spec = seq.speculator
            if spec is None or seq.n_past < len(seq.tokens) or room <= 0:
                continue
            if seq.next_forced() is not None:
                continue  # replaying or closing a reasoning block: those tokens are known
            left = min(seq.max_new - len(seq.generated) - 1, EXACT_ROWS - 1, room)
            if left <= 0:
                continue
            draft = spec.propose(threshold, left)
            if draft:
                drafts[id(seq)] = draft
                room -= len(draft)
        return drafts

    def _verify(self, seq: _Seq, idx: int, draft: list[int], active: list[_Seq]) -> None:
        """Sample `seq` at row `idx` (its token this step) and on along its draft's rows while
        the target's token equals the draft's: each accepted draft token is one more token of
        this step, sampled exactly as a step of its own would have (the same chain, the same
        draws). The KV cells of the draft tokens after the first mismatch are removed."""
        slot = seq.slot
        assert slot is not None
        if seq.generated:
            slot.cached.append(seq.next_token)
        else:
            slot.cached = list(seq.tokens)
        accepted = 0
        for i in range(len(draft) + 1):
            forced = seq.next_forced()
            if forced is not None:  # resuming: the token the earlier worker generated here
                sampling.force(self.candidates, seq.sampler, seq.guide, forced)
                token = forced
            elif seq.guide is None:
                token = llama_cpp.llama_sampler_sample(seq.sampler, self.ctx, idx + i)
            else:
                try:
                    token = sampling.sample_constrained(self.candidates, self.ctx, idx + i,
                                                        seq.sampler, seq.guide)
                except sampling.DeadEnd as e:
                    log.warning("request %s: %s", seq.req.request_id, e)
                    self._release(seq, active, keep_cache=False)
                    self.fail(seq, e)
                    return
            logprob = (self._logprob(token, idx + i, seq.req.logprobs)
                       if seq.req.logprobs is not None and forced is None else None)
            accepting = i < len(draft) and token == draft[i]
            if accepting:
                accepted += 1
            if seq.speculator is not None:
                seq.speculator.feed([token])
            reason = self.take(seq, token, logprob)
            if reason is not None:
                self._drafted(seq, len(draft), accepted)
                slot.exact = min(slot.exact, len(slot.cached))  # (draft cells past it stay)
                self._release(seq, active, keep_cache=reason not in ("abort", "error"))
                return
            seq.next_token = token
            if not accepting:
                break
            slot.cached.append(token)  # its cell, computed in this step, holds this token
        if draft:
            self._drafted(seq, len(draft), accepted)
            if accepted < len(draft):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, len(slot.cached), -1)
            slot.exact = min(slot.exact, len(slot.cached))

    def _drafted(self, seq: _Seq, proposed: int, accepted: int) -> None:
        if proposed <= 0 or seq.speculator is None or seq.drafted is None:
            return
        seq.speculator.record(proposed, accepted)
        seq.drafted[0] += proposed
        seq.drafted[1] += accepted
        self.drafted[0] += proposed
        self.drafted[1] += accepted

    def _release(self, seq: _Seq, active: list[_Seq], keep_cache: bool) -> None:
        if seq in active:
            active.remove(seq)
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        seq.guide = None
        seq.speculator = None
        if seq.prompt is not None:
            seq.prompt.free()
            seq.prompt = None
        slot = seq.slot
        if slot is not None:
            if not keep_cache:
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                slot.cached = []
                slot.exact = 0
            slot.busy = False
            slot.last_used = time.monotonic()
            seq.slot = None

    def _logprob(self, token: int, idx: int, k: int) -> LogprobEntry:
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
        return logprob_entry(piece.decode("utf-8", errors="replace"), float(lps[token]), piece,
                             top)

    def close(self) -> None:
        if not self.stop_scheduler():
            return
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self._free_native()
        self.llm.close()

    def _free_native(self) -> None:
        """Free the context, its batch, and the draft model and projector if any (the model
        itself goes with `self.llm`)."""
        if self.draft_model is not None:
            self.draft_model.close()
        if self.projector is not None:
            self.projector.close()
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
