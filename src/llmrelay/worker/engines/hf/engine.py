"""The transformers engine's causal LMs: any folder transformers loads (with its own chat
template), or a GGUF file dequantized by transformers (`from_pretrained(folder, gguf_file=name)`).

Batching: a request that arrives while nothing else runs is generated with plain `generate`
(fastest for one sequence). As soon as a second request arrives, the running one moves into
transformers' own continuous batching manager (`init_continuous_batching`), where requests
join and leave at every step, each with its own temperature, top_p, top_k, stop tokens and
length; a router thread hands the manager's outputs to their requests, and a request ended here
(stop string, reader gone) is cancelled there. Penalties and a request's seed apply alone and
batched (`sampling.request_processors`, carried into the manager by `compat.BatchProcessors`),
and so do output constraints (tool calls, JSON schemas, through llguidance: `constraints.py`)
and logit_bias, first among a request's processors; logprobs are not served by this engine.
A vision-language model (an HF folder with a vision config and a processor) loads with
`AutoProcessor` and `AutoModelForImageTextToText`; its images reach the batch as image ids
(`vision.py`), and a request with images always goes to the batch manager, whose prefix cache
then keeps its image's tokens (counted in the status, `prefix_cache`).
What every threaded engine shares (prompt rules, echo, stop strings, the final flush, the
hand-off to the event loop) is `threaded.ThreadedEngine`'s; its `aclose` runs `close` off the
event loop, which stops the manager and both threads and fails the requests left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from collections import deque
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    ContinuousBatchingConfig,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from llmrelay.protocol import ErrorCode, Features, LogprobEntry
from llmrelay.worker import templates
from llmrelay.worker.engines.base import EngineError, GenerationRequest, images_of
from llmrelay.worker.engines.hf import compat
from llmrelay.worker.engines.hf.constraints import Constrained, LogitBias, load_grammars
from llmrelay.worker.engines.hf.options import (
    GiB,
    Options,
    available_memory,
    check_memory,
    load_error,
    torch_dtype,
)
from llmrelay.worker.engines.hf.sampling import Forced, request_processors, seeded
from llmrelay.worker.engines.hf.vision import Uses, Vision, is_vision_model, template_messages
from llmrelay.worker.engines.threaded import Generation, Mailbox, ThreadedEngine
from llmrelay.worker.templates import ChatTemplateError

log = logging.getLogger("llmrelay.worker")

DEFAULT_PARALLEL = 16
PAGE_SIZE = 64
GREEDY_TEMPERATURE = 1e-6  # the batch manager always samples; this makes it an argmax
KV_CACHE_BUDGET = 1 * GiB  # the batch manager's paged KV cache, allocated at load


class _Seq(Generation):
    """A request inside the scheduler: its own logits processors, and its place in the batch."""

    def __init__(self, req: GenerationRequest, mailbox: Mailbox) -> None:
        super().__init__(req, mailbox)
        self.procs = LogitsProcessorList()  # constraint, logit bias, penalties, seeded sampler
        self.guard: Constrained | None = None  # its constraint (which may dead-end)
        self.rid = ""  # its id in the batch manager
        self.cb_seen = 0  # tokens of the current batch request already taken
        self.images = Uses()  # the images it holds (vision models)


class _Streamer:
    """generate()'s streamer: every new token goes to the engine (the first put is the prompt)."""

    def __init__(self, engine: TransformersEngine, seq: _Seq) -> None:
        self.engine, self.seq, self.first = engine, seq, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:
            self.first = False
            return
        for t in value.reshape(-1).tolist():
            if not self.seq.done:
                self.engine.take(self.seq, int(t))
        self.engine.wake()

    def end(self) -> None:
        pass


class _Until(StoppingCriteria):
    """Stops a solo generate() when the request is done or cancelled, or another one arrives."""

    def __init__(self, engine: TransformersEngine, seq: _Seq) -> None:
        self.engine, self.seq = engine, seq

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
        stop = self.seq.done or self.seq.gone or bool(self.engine.inbox)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TransformersEngine(ThreadedEngine):
    name = "transformers"
    generation_class = _Seq

    def __init__(self, options: Options, device: str) -> None:
        super().__init__()
        compat.check()  # before reading gigabytes of weights
        path = options.path
        self.path = path
        self.device = device
        self.default_seed = options.seed
        self.parallel = max(1, options.parallel or DEFAULT_PARALLEL)
        gguf = {"gguf_file": path.name} if path.is_file() else {}
        folder = path.parent if path.is_file() else path
        dtype = torch_dtype(options.dtype, "float32" if device == "cpu" else "float16")
        check_memory(path, device, options, 4 if gguf else dtype.itemsize)
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa", **gguf}
        if device == "cuda":
            kwargs.update(self._cuda_placement(options))
        log.info("loading %s with transformers %s on %s (%s%s)", path, transformers.__version__,
                 device, str(dtype).replace("torch.", ""),
                 ", 8-bit" if options.load_8bit else ", 4-bit" if options.load_4bit else "")
        vision = not gguf and is_vision_model(path)
        self.processor: Any = None
        try:
            if vision:
                self.processor = AutoProcessor.from_pretrained(folder)
                self.tokenizer = self.processor.tokenizer
                model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
                model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, ImportError, TypeError) as e:
            raise load_error(path, e) from e
        if device in ("cpu", "mps") and "device_map" not in kwargs:
            model = model.to(device)
        if options.load_8bit and device == "cpu":
            log.info("quantizing the Linear layers to int8 (torch dynamic quantization)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.ao.quantization import quantize_dynamic

                model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.eval()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vision = self._vision(model, cfg) if vision else None
        trained = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self._n_ctx = min(options.context_length, trained) if options.context_length else trained
        self.n_vocab = int(getattr(cfg, "vocab_size", len(self.tokenizer)))
        tok = self.tokenizer
        self.eos_ids: set[int] = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
            if isinstance(source, int):
                self.eos_ids.add(source)
            elif isinstance(source, list):
                self.eos_ids.update(int(x) for x in source)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos_ids, default=0)
        own = getattr(self.processor, "chat_template", None) or getattr(tok, "chat_template", None)
        self.own_template = bool(own) and not options.chat_template
        self.chat_template = templates.choose(
            own=own, requested=options.chat_template,
            architecture=getattr(cfg, "model_type", ""),
            bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        self.grammars = load_grammars(tok, self.n_vocab, sorted(self.eos_ids))
        self.inbox: deque[_Seq] = deque()
        self.batch: dict[str, _Seq] = {}  # the requests in the batch manager, by their id there
        self.batch_lock = threading.Lock()
        self.counter = 0
        self.manager = self._manager()
        self.thread = threading.Thread(target=self._run, name="transformers-scheduler", daemon=True)
        self.thread.start()
        self.router = threading.Thread(target=self._route, name="transformers-router", daemon=True)
        self.router.start()
        log.info("loaded %s (%s%s, %.0fM parameters, context %d, up to %d sequences batched, chat "
                 "template: %s)", path.name, getattr(cfg, "model_type", "?"),
                 ", reads images" if self.vision else "",
                 sum(p.numel() for p in model.parameters()) / 1e6, self._n_ctx, self.parallel,
                 self.chat_template.name)

    def _vision(self, model: Any, cfg: Any) -> Vision:
        """The images of a vision-language model (vision.py); EngineError for a model whose
        positions depend on its images, which image ids cannot carry."""
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
        if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("rope_type") == "mrope"):
            raise EngineError(f"{getattr(model.config, 'model_type', 'this model')}: its positions "
                              "depend on its images (M-RoPE), which this engine cannot serve yet")
        rows = int(model.get_input_embeddings().weight.shape[0])
        return Vision(self.processor, model, max(rows, int(getattr(cfg, "vocab_size", 0) or 0)))

    @staticmethod
    def _cuda_placement(options: Options) -> dict[str, Any]:
        """from_pretrained's arguments that place the model on CUDA GPUs (and quantize it)."""
        kwargs: dict[str, Any] = {}
        n = options.num_gpus or 1
        kwargs["device_map"] = "auto" if n > 1 or options.cpu_offloading else "cuda:0"
        if options.max_gpu_memory or n > 1:
            cap = options.max_gpu_memory or f"{torch.cuda.mem_get_info(0)[1] // GiB}GiB"
            kwargs["max_memory"] = {i: cap for i in range(n)}
            if options.cpu_offloading:
                kwargs["max_memory"]["cpu"] = f"{available_memory('cpu', 0, None) // GiB}GiB"
        if options.load_8bit or options.load_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=options.load_8bit, load_in_4bit=options.load_4bit,
                llm_int8_enable_fp32_cpu_offload=options.cpu_offloading)
        return kwargs

    def _manager(self) -> Any:
        gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=self.n_vocab, top_p=0.99,
                              eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id,
                              max_new_tokens=256)
        cache_tokens, per_token = self._cache_size()
        log.info("batch KV cache: %d tokens (%.0f MiB) shared by up to %d requests",
                 cache_tokens, cache_tokens * per_token / 2**20, self.parallel)
        cbc = ContinuousBatchingConfig(
            per_request_processors=True, page_size=PAGE_SIZE,
            num_blocks=max(8, math.ceil(cache_tokens / PAGE_SIZE)),
            # the decode fast path (flash attention on a GPU) for a request as long as the
            # context; elsewhere transformers turns it off, with a warning when it was asked for
            max_blocks_per_request=math.ceil(self._n_ctx / PAGE_SIZE) if self.device == "cuda"
            else None,
            max_requests_per_batch=self.parallel, seed=self.default_seed)
        manager = self.model.init_continuous_batching(generation_config=gc, continuous_batching_config=cbc)
        compat.check_manager(manager)
        compat.skip_noop_warpers(manager)
        self.processors = compat.BatchProcessors()
        self.batch_processors = self.processors.install(manager)
        # Allocate the cache now, while loading: done lazily by the manager's thread, it competed
        # with the first requests for seconds.
        try:
            manager.warmup()
        except Exception as e:  # only an optimisation: the manager still allocates on its own
            log.warning("could not prepare the batch manager ahead (%s: %s)", type(e).__name__, e)
        if self.device == "cpu":  # on a GPU multinomial is cheap, and its graphs are left alone
            compat.fast_sampling(manager)
        vision = self.vision
        self.prefix_cache = compat.PrefixCache(epoch=(lambda: vision.epoch) if vision else None)
        self.prefix_cache.install(manager)
        manager.start()
        return manager

    def _cache_size(self) -> tuple[int, int]:
        """Tokens of paged KV cache for the batch manager, and bytes per token. Enough for
        `parallel` requests of up to 2048 tokens, within KV_CACHE_BUDGET, never less than one
        request of the whole context (the manager makes requests wait for free blocks)."""
        cfg = self.model.config.get_text_config()
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 64) // heads)
        layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
        per_token = 2 * layers * kv_heads * head_dim * self.model.dtype.itemsize
        want = self.parallel * min(self._n_ctx, 2048)
        return max(self._n_ctx, min(want, KV_CACHE_BUDGET // per_token)), per_token

    # ---- the model side of ThreadedEngine ----------------------------------------------------

    def context_length(self) -> int:
        return self._n_ctx

    def features(self) -> Features:
        # Constraints and logit bias must also hold inside the batch: not offered where the
        # batch manager cannot run a request's own processors (asynchronous batching).
        exact = self.batch_processors
        constrained = exact and self.grammars is not None
        return Features(chat=True, completions=True, prompt_token_ids=True, logprobs=False,
                        seed=True, penalties=True, tools=constrained, json_schema=constrained,
                        logit_bias=exact, continuation=exact, tokenize=True,
                        vision=self.vision is not None)

    def status(self) -> dict[str, Any]:
        cache = self.prefix_cache
        return {**super().status(),
                "prefix_cache": {"enabled": cache.enabled, "hits": cache.hits, "tokens": cache.tokens}}

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def vocab_size(self) -> int:
        return self.n_vocab

    def is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    variables: dict[str, Any] | None = None) -> str:
        if self.vision is not None:
            messages = template_messages(messages)
        if not self.own_template:
            return super().render_chat(messages, tools, variables)
        try:
            if self.processor is not None and getattr(self.processor, "chat_template", None):
                return str(self.processor.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=True,
                    **(variables or {})))
            return str(self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                          add_generation_prompt=True,
                                                          **(variables or {})))
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise ChatTemplateError(f"the chat template (model) failed: {e}") from e

    def piece(self, gen: Generation, token: int) -> bytes:
        # Decoding the whole suffix keeps SentencePiece's leading spaces right; the incremental
        # UTF-8 decoder holds back a character split across tokens.
        before = self.tokenizer.decode(gen.generated[-8:-1]) if len(gen.generated) > 1 else ""
        after = self.tokenizer.decode(gen.generated[-8:])
        return after[len(before):].encode("utf-8") if after.startswith(before) else \
            self.tokenizer.decode([token]).encode("utf-8")

    def prompt_tokens(self, req: GenerationRequest) -> list[int]:
        images = images_of(req.messages) if self.vision is not None and req.messages else []
        if not images or req.prompt_token_ids is not None:
            return super().prompt_tokens(req)
        assert self.vision is not None and req.messages is not None
        text = self.render_chat(req.messages, req.template_tools, req.template_kwargs)
        return self.vision.prompt(text, images)

    def prepare(self, gen: Generation) -> None:
        assert isinstance(gen, _Seq)
        gen.stop_ids |= self.eos_ids  # what ends it, for generate() and the batch manager
        req = gen.req
        seed = req.seed if req.seed is not None else self.default_seed
        first = []  # before penalties, temperature and the seeded draw, as llama.cpp's chain
        if req.constraint is not None:
            if self.grammars is None:
                raise EngineError("output constraints need llguidance, which this worker lacks",
                                  ErrorCode.VALIDATION_TYPE_ERROR)
            # compiled here (cached): a schema it cannot enforce is refused before queueing
            gen.guard = Constrained.of(self.grammars, req.constraint, len(gen.tokens))
            first.append(gen.guard)
        if req.logit_bias:
            first.append(LogitBias(req.logit_bias, self.n_vocab))
        last = ([Forced(len(gen.tokens), gen.forced_at)]
                if gen.forced or gen.reasoning is not None else [])
        gen.procs = LogitsProcessorList([*first, *request_processors(len(gen.tokens), req, seed),
                                         *last])
        if self.vision is not None and req.messages and req.prompt_token_ids is None:
            images = images_of(req.messages)
            if images:  # the image tokens become the images' ids (vision.py), last: held from here
                gen.tokens = self.vision.embed(gen.tokens, images, gen.images)

    def take(self, gen: Generation, token: int,
             logprob: LogprobEntry | None = None) -> str | None:
        guard = getattr(gen, "guard", None)
        if guard is not None and guard.error is not None and not gen.done:
            self.fail(gen, guard.error)  # a dead end: the token was only there to end it
            return "error"
        return super().take(gen, token, logprob)

    def submit(self, gen: Generation) -> None:
        assert isinstance(gen, _Seq)
        self.inbox.append(gen)

    def finish(self, gen: Generation, reason: str, stop_hit: bool = False) -> str:
        self._release(gen)
        return super().finish(gen, reason, stop_hit)

    def fail(self, gen: Generation, error: Exception) -> None:
        self._release(gen)
        super().fail(gen, error)

    def _release(self, gen: Generation) -> None:
        if self.vision is not None and isinstance(gen, _Seq) and gen.images.digests:
            self.vision.release(gen.images)

    # ---- the scheduler thread: solo generate(), or hand over to the batch manager ----------

    def _run(self) -> None:
        while True:
            self.wake()
            with self.cond:
                while not self.closed and not self.inbox:
                    self.cond.wait()
                if self.closed:
                    break
                seq = self.inbox.popleft()
                alone = not self.inbox
            if seq.gone:
                self.finish(seq, "abort")
                continue
            with self.batch_lock:
                # (a prompt with images goes to the batch manager even alone: its prefix cache
                # keeps the image's tokens for the next turn)
                alone = alone and not self.batch and not seq.images.digests
            try:
                if alone:
                    self._solo(seq)
                if not seq.done:
                    self._to_batch(seq)
            except Exception as e:  # a failed request fails alone, never the thread
                log.exception("request %s failed", seq.req.request_id)
                self.fail(seq, EngineError(f"transformers failed: {type(e).__name__}: {e}"))
        with self.cond:
            left = list(self.inbox)
        for seq in left:
            self.fail(seq, EngineError("the engine is shutting down"))
        self.wake()

    @torch.inference_mode()
    def _solo(self, seq: _Seq) -> None:
        req = seq.req
        # A seeded request draws with its own sampler (in seq.procs), then generate picks its draw.
        sample = req.temperature >= 1e-5 and not seeded(seq.procs)
        gc = GenerationConfig(
            do_sample=sample, temperature=req.temperature if sample else None,
            top_p=req.top_p if sample else None,
            top_k=(req.top_k if req.top_k > 0 else 0) if sample else None,
            max_new_tokens=seq.max_new, eos_token_id=sorted(seq.stop_ids), pad_token_id=self.pad_id)
        ids = torch.tensor([seq.tokens], device=self.model.device)
        self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                            logits_processor=seq.procs, streamer=_Streamer(self, seq),
                            stopping_criteria=StoppingCriteriaList([_Until(self, seq)]))
        if seq.gone:
            self.finish(seq, "abort")
        elif not seq.done and len(seq.generated) >= seq.max_new:
            self.finish(seq, "length")
        elif not seq.done and not self.inbox:
            self.finish(seq, "stop")  # generate ended on its own (an end token it stopped on)

    def _to_batch(self, seq: _Seq) -> None:
        """Hand a request (new, or interrupted in solo mode) to the continuous batching manager."""
        req = seq.req
        self.counter += 1
        seq.rid = f"{req.request_id}-{self.counter}"
        if seq.procs:
            if self.batch_processors:
                self.processors.wanted[seq.rid] = seq.procs
            else:
                log.warning("request %s: its penalties and seed are not applied while requests "
                            "are batched (asynchronous batching)", req.request_id)
        seq.cb_seen = 0
        with self.batch_lock:
            self.batch[seq.rid] = seq
        rid = self.manager.add_request(
            seq.tokens + seq.generated, request_id=seq.rid, streaming=True,
            max_new_tokens=seq.max_new - len(seq.generated), eos_token_id=sorted(seq.stop_ids),
            temperature=float(max(req.temperature, GREEDY_TEMPERATURE)),
            top_p=float(req.top_p if req.temperature >= 1e-5 else 1.0),
            top_k=int(req.top_k if req.top_k > 0 else self.n_vocab))
        if rid is None:
            with self.batch_lock:
                self._leave(seq.rid)
            raise EngineError("the batch manager refused the request (stopping)")

    def _leave(self, rid: str) -> None:
        """A request leaves the batch (called with batch_lock held)."""
        self.batch.pop(rid, None)
        self.processors.wanted.pop(rid, None)

    # ---- the router thread: batch outputs -> requests -----------------------------------------

    def _route(self) -> None:
        while not self.closed:
            out = self.manager.get_result(timeout=0.1)
            with self.batch_lock:
                self._drop_ended()
                if out is None:
                    if not self.manager.is_running() and self.batch and not self.closed:
                        err = compat.fatal_error(self.manager)
                        for seq in self.batch.values():
                            self.fail(seq, EngineError(f"the batch manager stopped: {err}"))
                        self.batch.clear()
                        self.processors.wanted.clear()
                    self.wake()
                    continue
                seq = self.batch.get(out.request_id)
            if seq is not None:
                self._deliver(seq, out)
            self.wake()

    def _drop_ended(self) -> None:
        """Requests ended here (stop string, reader gone) end in the manager too (batch_lock
        held)."""
        for rid, seq in list(self.batch.items()):
            if seq.done or seq.gone:
                self._leave(rid)
                self.manager.cancel_request(rid)
                self.finish(seq, "abort")

    def _deliver(self, seq: _Seq, out: Any) -> None:
        """One output of the batch manager: the request's new tokens, and maybe its end."""
        new = list(out.generated_tokens)[seq.cb_seen:]
        seq.cb_seen += len(new)
        for t in new:
            if not seq.done:
                self.take(seq, int(t))
        if out.is_finished() or seq.done:
            with self.batch_lock:
                self._leave(out.request_id)
            if out.error and not seq.done:
                self.fail(seq, EngineError(f"generation failed: {out.error}"))
            elif not seq.done:
                reached = len(seq.generated) >= seq.max_new
                self.finish(seq, "length" if reached else "stop")
            if not out.is_finished():
                self.manager.cancel_request(out.request_id)

    def close(self) -> None:
        if not self.stop_scheduler():
            return
        with contextlib.suppress(Exception):
            self.manager.stop(block=True, timeout=10)
        self.thread.join(timeout=10)
        with self.batch_lock:
            left = list(self.batch.values())
            self.batch.clear()
        for seq in left:  # their readers would wait forever otherwise
            self.fail(seq, EngineError("the engine is shutting down"))
        self.wake()

