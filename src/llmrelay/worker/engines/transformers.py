"""The transformers engine: Hugging Face models through torch + transformers.

Serves any causal-LM folder that transformers loads (with its own chat template), a GGUF file
dequantized by transformers (`from_pretrained(folder, gguf_file=name)`), and sentence-embedding
models (mean pooling + L2 norm, e.g. the bundled all-MiniLM-L6-v2).

Flags: `--device cpu|cuda|mps` (default: the best present), `--num-gpus N` (layers spread over N
GPUs with accelerate's device_map), `--max-gpu-memory`, `--load-8bit` (bitsandbytes on CUDA;
torch's dynamic int8 quantization of the Linear layers on CPU, as FastChat allows),
`--load-4bit` (bitsandbytes, CUDA only), `--dtype`. Before loading, the memory the weights need
is estimated from the files and compared with what the device has; a model that does not fit is
refused with both figures and the flag that would help.

Batching: a request that arrives while nothing else runs is generated with plain `generate`
(fastest for one sequence). As soon as a second request arrives, the running one moves into
transformers' own continuous batching manager (`init_continuous_batching`), where requests
join and leave at every step, each with its own temperature, top_p, top_k, stop tokens and
length; stop strings are cut here (`StopMatcher`) and end the request with `cancel_request`.
Repetition/presence/frequency penalties and a request's seed apply alone and batched
(`_BatchProcessors` adds them to the batch manager, per request): a seeded request draws its
tokens from its own generator (`_SeededSampler`), so the same seed gives the same text whether
the request ran alone, batched, or both; logprobs are not served by this engine.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import re
import struct
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmrelay.worker import templates
from llmrelay.worker.engines.base import (
    Chunk,
    Emit,
    Engine,
    EngineError,
    GenerationRequest,
    StopMatcher,
)
from llmrelay.worker.templates import ChatTemplateError

log = logging.getLogger("llmrelay.worker")

DEFAULT_PARALLEL = 16
PAGE_SIZE = 64
GREEDY_TEMPERATURE = 1e-6  # the batch manager always samples; this makes it an argmax
GiB = 1024**3
KV_CACHE_BUDGET = 1 * GiB  # the batch manager's paged KV cache, allocated at load
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ---- flags and memory ---------------------------------------------------------------------------


@dataclass
class LoadOptions:
    device: str | None = None
    num_gpus: int | None = None
    max_gpu_memory: str | None = None
    load_8bit: bool = False
    load_4bit: bool = False
    dtype: str | None = None
    cpu_offloading: bool = False
    context_length: int | None = None
    chat_template: str | None = None
    parallel: int | None = None
    seed: int | None = None
    n_threads: int | None = None
    embed_truncate: bool = False


def parse_size(text: str) -> int:
    """'12GiB', '12GB', '800MiB', '12' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise EngineError(f"--max-gpu-memory {text!r} is not a size; write e.g. 12GiB or 800MiB")
    unit = (m.group(2) or "GiB").upper().rstrip("B")
    power = {"K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if unit.endswith("I") or len(unit) == 1 else 1000
    return int(float(m.group(1)) * base**power)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_flags(opts: LoadOptions) -> str:
    """The device to load on, after refusing the flags this machine cannot honour."""
    gpus = _cuda_count()
    device = opts.device or ("cuda" if gpus else "mps" if _mps() else "cpu")
    if device in ("xpu", "npu"):
        raise EngineError(f"--device {device} is not supported by the transformers engine of "
                          "llmrelay; use --device cpu, cuda or mps")
    if device == "cuda" and not gpus:
        raise EngineError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here. Use "
                          "--device cpu, or install a CUDA build of torch on a machine with a GPU.")
    if device == "mps" and not _mps():
        raise EngineError("--device mps: Apple's Metal (MPS) backend is not available here; "
                          "use --device cpu")
    n = opts.num_gpus
    if n is not None and n > 1:
        if device != "cuda":
            raise EngineError(f"--num-gpus {n}: spreading a model over GPUs needs CUDA GPUs, and "
                              f"this worker runs on {device} (torch sees {gpus} CUDA GPUs). Drop "
                              "--num-gpus, or run on a machine with that many GPUs.")
        if n > gpus:
            raise EngineError(f"--num-gpus {n}: torch sees only {gpus} CUDA GPUs here "
                              "(check CUDA_VISIBLE_DEVICES / --gpus)")
    elif n and device != "cuda":
        log.warning("--num-gpus %s ignored: running on %s", n, device)
    if opts.max_gpu_memory:
        parse_size(opts.max_gpu_memory)
        if device != "cuda":
            log.warning("--max-gpu-memory ignored: running on %s", device)
    if opts.load_8bit and opts.load_4bit:
        raise EngineError("--load-8bit and --load-4bit exclude each other; pick one")
    if opts.load_4bit and device != "cuda":
        raise EngineError(f"--load-4bit needs a CUDA GPU (bitsandbytes 4-bit); this worker runs on "
                          f"{device}. On CPU use --load-8bit (torch int8 dynamic quantization).")
    if (opts.load_8bit or opts.load_4bit) and device == "cuda" and not _has("bitsandbytes"):
        raise EngineError("--load-8bit/--load-4bit on CUDA need bitsandbytes: "
                          "`pip install bitsandbytes`")
    if opts.load_8bit and device == "mps":
        raise EngineError("--load-8bit is not supported on mps; use --device cpu --load-8bit")
    if opts.load_8bit and device == "cpu" and opts.dtype not in (None, "float32"):
        raise EngineError(f"--load-8bit on CPU quantizes float32 Linear layers to int8; it cannot be "
                          f"combined with --dtype {opts.dtype} (drop --dtype)")
    if opts.dtype == "float16" and device == "cpu":
        log.warning("--dtype float16 on CPU is slow and some operations lack float16 kernels; "
                    "bfloat16 or float32 are the usual CPU choices")
    if opts.cpu_offloading and device != "cuda":
        log.warning("--cpu-offloading ignored: it only applies to CUDA (layers that do not fit in "
                    "GPU memory go to the CPU)")
    return device


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def count_parameters(path: Path) -> tuple[int, int]:
    """(parameters, bytes as stored), read from safetensors headers or GGUF metadata only."""
    if path.is_file():  # GGUF
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        n = sum(int(t.n_elements) for t in reader.tensors)
        return n, path.stat().st_size
    n = stored = 0
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            k = math.prod(meta["shape"])
            n += k
            stored += k * BYTES.get(meta["dtype"], 4)
    if not files:  # pytorch_model*.bin: guess from the file sizes (float32 unless told)
        stored = sum(f.stat().st_size for f in path.glob("*.bin"))
        n = stored // 4
    return n, stored


def available_memory(device: str, num_gpus: int, max_gpu_memory: str | None) -> int:
    if device == "cuda":
        total = 0
        for i in range(max(1, num_gpus)):
            free, _ = torch.cuda.mem_get_info(i)
            total += min(free, parse_size(max_gpu_memory)) if max_gpu_memory else free
        return total
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]


def check_memory(path: Path, device: str, opts: LoadOptions, default_bytes: int) -> None:
    """Refuse, before loading, a model whose weights would not fit (with 20% headroom)."""
    try:
        n, _ = count_parameters(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise EngineError(f"transformers could not load {path}: its weight files are unreadable "
                          f"({type(e).__name__}: {e})") from e
    per = 0.5 if opts.load_4bit else 1.0 if opts.load_8bit else DTYPES[opts.dtype].itemsize \
        if opts.dtype else default_bytes
    need = int(n * per * 1.2)
    have = available_memory(device, opts.num_gpus or 1, opts.max_gpu_memory)
    log.info("memory: %.2f GiB needed for %.0fM parameters at %s bytes each, %.2f GiB available "
             "on %s", need / GiB, n / 1e6, per, have / GiB, device)
    if need <= have:
        return
    hints = []
    for flag, b in (("--dtype bfloat16", 2), ("--load-8bit", 1), ("--load-4bit", 0.5)):
        if b < per and n * b * 1.2 <= have and (flag != "--load-4bit" or device == "cuda"):
            hints.append(f"{flag} (about {n * b * 1.2 / GiB:.1f} GiB)")
    if device == "cuda" and (opts.num_gpus or 1) < _cuda_count():
        hints.append(f"--num-gpus {_cuda_count()} (spread the layers over every GPU)")
    advice = ("try " + " or ".join(hints)) if hints else "no flag makes it fit on this machine"
    raise EngineError(
        f"{path} needs about {need / GiB:.1f} GiB ({n / 1e9:.2f}B parameters at {per:g} bytes each "
        f"+ 20%) but only {have / GiB:.1f} GiB is available on {device}; {advice}.")


def is_embedding_model(path: Path) -> bool:
    """A sentence-transformers folder, or an HF encoder (BertModel & co.) rather than a causal LM."""
    if path.is_file():
        return False
    if (path / "modules.json").exists():
        return True
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(archs) and not any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel"))
                                   for a in archs)


def build(path: Path, opts: LoadOptions) -> Engine:
    """Check the flags and the memory, then load `path` (HF folder or GGUF file)."""
    if opts.n_threads:
        torch.set_num_threads(opts.n_threads)
    device = check_flags(opts)
    if is_embedding_model(path):
        return EmbeddingEngine(path, device, opts)
    return TransformersEngine(path, device, opts)


def _skip_noop_warpers(manager: Any) -> None:
    """The batch manager's per-request top-k and top-p warpers sort the whole vocabulary for
    every sequence at every step, even when no request in the batch asks for them (top_k off,
    top_p 1.0: most OpenAI requests); that was a fifth of a step on CPU. Here they pass the
    scores through unchanged in that case (same results, as a no-op filter would)."""
    from transformers.generation.continuous_batching import cb_logits_processors as cb

    class TopK(cb.ContinuousBatchingTopKLogitsWarper):
        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            if bool((tensor_arg[: scores.size(0)] >= scores.size(-1)).all()):
                return scores
            return super().__call__(scores, tensor_arg)

    class TopP(cb.ContinuousBatchingTopPLogitsWarper):
        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            if bool((tensor_arg[: scores.size(0)].view(dtype=torch.float32) >= 1.0).all()):
                return scores
            return super().__call__(scores, tensor_arg)

    procs = getattr(getattr(manager, "logit_processor", None), "logits_processor", None) or []
    for proc in procs:
        if type(proc) is cb.ContinuousBatchingTopKLogitsWarper:
            proc.__class__ = TopK
        elif type(proc) is cb.ContinuousBatchingTopPLogitsWarper:
            proc.__class__ = TopP


def _draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (shape [rows, 1]), drawn by inverse CDF: the distribution of
    torch.multinomial(probs, 1), ~35x faster on CPU over a whole vocabulary (8 rows of 49,152:
    0.2 against 7.8 ms). A token of probability 0 is never drawn (u is in (0, total])."""
    cdf = probs.cumsum(-1)
    u = torch.rand((*probs.shape[:-1], 1), generator=generator, device=probs.device,
                   dtype=cdf.dtype)
    return torch.searchsorted(cdf, (1.0 - u) * cdf[..., -1:]).clamp_(max=probs.size(-1) - 1)


def _fast_sampling(manager: Any) -> None:
    """The batch manager draws each step's tokens with torch.multinomial, which on CPU cost ~6%
    of a step of 8 sequences; here it draws them with `_draw` (same distribution). A manager
    whose model runner is not there yet (made lazily if warmup failed) keeps its own."""
    runner = getattr(getattr(manager, "batch_processor", None), "model_runner", None)
    if runner is None or not callable(getattr(runner, "_sample", None)):
        log.debug("batch manager: its own sampling kept (no model runner to adjust)")
        return

    class Runner(type(runner)):  # type: ignore[misc]
        def _sample(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
            if not self.do_sample or self.return_logprobs:
                return super()._sample(scores, output_ids)
            tokens = _draw(torch.softmax(scores[0], dim=-1)).squeeze(-1)
            output_ids[0, : tokens.size(0)].copy_(tokens)
            return None

    runner.__class__ = Runner


class _BatchProcessors:
    """A request's own logits processors (penalties, its seeded sampler) inside transformers'
    batch manager, which has none per request. The scores' rows are the batch's requests that
    predict a token this step, in the order the manager prepared them: `install` records that
    order where the manager prepares its per-request arguments. Synchronous batching only (the
    manager's CPU mode); with asynchronous batching (CUDA graphs) the next batch is prepared
    while one runs, so `install` declines and these are then not applied while batched."""

    def __init__(self) -> None:
        self.wanted: dict[str, LogitsProcessorList] = {}  # request id -> its processors
        self.rows: list[Any] = []

    def install(self, manager: Any) -> bool:
        lp = getattr(manager, "logit_processor", None)
        cfg = getattr(manager, "continuous_batching_config", None)
        if lp is None or not getattr(lp, "do_processing", False) or getattr(
                cfg, "use_async_batching", True) is not False:
            return False
        prepare = lp.prepare_tensor_args

        def recording(requests_in_batch: list[Any], arg_storage: torch.Tensor) -> torch.Tensor:
            self.rows = [r.state for r in requests_in_batch if r.has_new_token]
            return prepare(requests_in_batch=requests_in_batch, arg_storage=arg_storage)

        lp.prepare_tensor_args = recording
        lp.logits_processor.insert(0, self)  # before temperature and top-k/top-p, as generate()
        return True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.wanted:
            return scores
        out = None
        for i, state in enumerate(self.rows[: scores.size(0)]):
            procs = self.wanted.get(state.request_id)
            if procs is None:
                continue
            if out is None:
                out = scores.clone()
            ids = torch.tensor([list(state.initial_tokens) + list(state.generated_tokens)],
                               dtype=torch.long, device=scores.device)
            out[i] = procs(ids, out[i : i + 1])[0]
        return scores if out is None else out


def _load_error(path: Path, e: Exception) -> EngineError:
    return EngineError(f"transformers could not load {path}: {type(e).__name__}: {e}")


# ---- generation -----------------------------------------------------------------------------------


@dataclass
class _Seq:
    req: GenerationRequest
    tokens: list[int]
    max_new: int
    cancel: threading.Event
    stop_ids: set[int]
    emit: Emit
    generated: list[int] = field(default_factory=list)
    stops: StopMatcher | None = None
    decoder: Any = None
    procs: LogitsProcessorList = field(default_factory=LogitsProcessorList)  # penalties, seed
    done: bool = False
    rid: str = ""
    cb_seen: int = 0  # tokens of the current batch request already taken
    cb_base: int = 0  # tokens generated before the request joined the batch

    @property
    def gone(self) -> bool:
        return self.cancel.is_set()


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
                self.engine._take(self.seq, int(t))

    def end(self) -> None:
        pass


class _Until(StoppingCriteria):
    """Stops a solo generate() when the request is done or cancelled, or another one arrives."""

    def __init__(self, engine: TransformersEngine, seq: _Seq) -> None:
        self.engine, self.seq = engine, seq

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
        stop = self.seq.done or self.seq.gone or bool(self.engine.inbox)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens."""

    def __init__(self, n_prompt: int, presence: float, frequency: float) -> None:
        self.n_prompt, self.presence, self.frequency = n_prompt, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = input_ids[:, self.n_prompt:]
        if gen.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _SeededSampler(LogitsProcessor):
    """Draws a seeded request's next token from its own generator, after temperature, top-k and
    top-p, and leaves only that token possible: generate()'s greedy pick and the batch manager's
    shared sampler both take it. The same sampler runs alone and batched (it moves with the
    request), so a seed gives the same text either way."""

    def __init__(self, seed: int, req: GenerationRequest) -> None:
        self.seed = seed
        self.generator: torch.Generator | None = None  # made on the device the scores are on
        # generate()'s own warpers, in its order
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(req.temperature)])
        if req.top_k > 0:
            self.warpers.append(TopKLogitsWarper(req.top_k))
        if req.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(req.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device)
            self.generator.manual_seed(self.seed)
        probs = torch.softmax(self.warpers(input_ids, scores.float()), dim=-1)
        token = _draw(probs, self.generator)
        return torch.full_like(scores, -math.inf).scatter_(-1, token, 0.0)


def _request_processors(n_prompt: int, req: GenerationRequest,
                        sampler: _SeededSampler | None) -> LogitsProcessorList:
    """What a request adds to the scores, in generate()'s order: repetition penalty, presence and
    frequency penalties, then its seeded draw."""
    procs = LogitsProcessorList()
    if req.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(req.repetition_penalty))
    if req.presence_penalty or req.frequency_penalty:
        procs.append(_Penalties(n_prompt, req.presence_penalty, req.frequency_penalty))
    if sampler is not None:
        procs.append(sampler)
    return procs


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, path: Path, device: str, opts: LoadOptions) -> None:
        self.path = path
        self.device = device
        self.default_seed = opts.seed
        self.parallel = max(1, opts.parallel or DEFAULT_PARALLEL)
        gguf = {"gguf_file": path.name} if path.is_file() else {}
        folder = path.parent if path.is_file() else path
        dtype = DTYPES[opts.dtype] if opts.dtype else (torch.float32 if device == "cpu" else
                                                        torch.float16)
        check_memory(path, device, opts, 4 if gguf else dtype.itemsize)
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "paged|sdpa", **gguf}
        if device == "cuda":
            n = opts.num_gpus or 1
            kwargs["device_map"] = "auto" if n > 1 or opts.cpu_offloading else "cuda:0"
            if opts.max_gpu_memory or n > 1:
                cap = opts.max_gpu_memory or f"{torch.cuda.mem_get_info(0)[1] // GiB}GiB"
                kwargs["max_memory"] = {i: cap for i in range(n)}
                if opts.cpu_offloading:
                    kwargs["max_memory"]["cpu"] = f"{available_memory('cpu', 0, None) // GiB}GiB"
            if opts.load_8bit or opts.load_4bit:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_8bit=opts.load_8bit, load_in_4bit=opts.load_4bit,
                    llm_int8_enable_fp32_cpu_offload=opts.cpu_offloading)
        log.info("loading %s with transformers %s on %s (%s%s)", path, transformers.__version__,
                 device, str(dtype).replace("torch.", ""),
                 ", 8-bit" if opts.load_8bit else ", 4-bit" if opts.load_4bit else "")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, ImportError, TypeError) as e:
            raise _load_error(path, e) from e
        if device in ("cpu", "mps") and "device_map" not in kwargs:
            model = model.to(device)
        if opts.load_8bit and device == "cpu":
            log.info("quantizing the Linear layers to int8 (torch dynamic quantization)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.ao.quantization import quantize_dynamic

                model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.eval()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        trained = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self._n_ctx = min(opts.context_length, trained) if opts.context_length else trained
        self.vocab_size = int(getattr(cfg, "vocab_size", len(self.tokenizer)))
        tok = self.tokenizer
        self.eos_ids: set[int] = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
            if isinstance(source, int):
                self.eos_ids.add(source)
            elif isinstance(source, list):
                self.eos_ids.update(int(x) for x in source)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos_ids, default=0)
        self.own_template = bool(getattr(tok, "chat_template", None)) and not opts.chat_template
        self.chat_template = templates.choose(
            own=getattr(tok, "chat_template", None), requested=opts.chat_template,
            architecture=getattr(cfg, "model_type", ""),
            bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        self.inbox: deque[_Seq] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.batch: dict[str, _Seq] = {}
        self.batch_lock = threading.Lock()
        self.counter = 0
        self.manager = self._manager()
        self.thread = threading.Thread(target=self._run, name="transformers-scheduler", daemon=True)
        self.thread.start()
        self.router = threading.Thread(target=self._route, name="transformers-router", daemon=True)
        self.router.start()
        log.info("loaded %s (%s, %.0fM parameters, context %d, up to %d sequences batched, chat "
                 "template: %s)", path.name, getattr(cfg, "model_type", "?"),
                 sum(p.numel() for p in model.parameters()) / 1e6, self._n_ctx, self.parallel,
                 self.chat_template.name)

    def _manager(self) -> Any:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=self.vocab_size, top_p=0.99,
                              eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id,
                              max_new_tokens=256)
        cache_tokens, per_token = self._cache_size()
        log.info("batch KV cache: %d tokens (%.0f MiB) shared by up to %d requests",
                 cache_tokens, cache_tokens * per_token / 2**20, self.parallel)
        cbc = ContinuousBatchingConfig(
            per_request_processors=True, page_size=PAGE_SIZE,
            num_blocks=max(8, math.ceil(cache_tokens / PAGE_SIZE)),
            max_blocks_per_request=math.ceil(self._n_ctx / PAGE_SIZE),
            max_requests_per_batch=self.parallel, seed=self.default_seed)
        manager = self.model.init_continuous_batching(generation_config=gc, continuous_batching_config=cbc)
        _skip_noop_warpers(manager)
        self.processors = _BatchProcessors()
        self.batch_processors = self.processors.install(manager)
        # Allocate the cache now, while loading: done lazily by the manager's thread, it competed
        # with the first requests for seconds.
        try:
            manager.warmup()
        except Exception as e:  # only an optimisation: the manager still allocates on its own
            log.warning("could not prepare the batch manager ahead (%s: %s)", type(e).__name__, e)
        if self.device == "cpu":  # on a GPU multinomial is cheap, and its graphs are left alone
            _fast_sampling(manager)
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

    # ---- the caller's side ----

    def context_length(self) -> int:
        return self._n_ctx

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if not self.own_template:
            return super().render_chat(messages)
        try:
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True))
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise ChatTemplateError(f"the chat template (model) failed: {e}") from e

    def _prompt_tokens(self, req: GenerationRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise EngineError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", 40302)
            return list(req.prompt_token_ids)
        if req.messages is not None:
            return self.tokenize(self.render_chat(req.messages), chat=True)
        return self.tokenize(req.prompt or "")

    def generate(self, req: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        return self.generate_from_start(req, cancel)

    def start(self, req: GenerationRequest, cancel: threading.Event, emit: Emit) -> None:
        if req.logprobs is not None:
            raise EngineError("logprobs are not served by the transformers engine", 40302)
        tokens = self._prompt_tokens(req)
        n_prompt, n_ctx = len(tokens), self.context_length()
        if n_prompt == 0:
            raise EngineError("the prompt is empty", 40302)
        if n_prompt >= n_ctx:
            raise EngineError(
                f"This model's maximum context length is {n_ctx} tokens. However, your prompt "
                f"has {n_prompt} tokens. Please shorten it.", 40303)
        room = n_ctx - n_prompt
        max_new = room if req.max_new_tokens is None else min(req.max_new_tokens, room)
        with self.cond:
            if self.closed:
                raise EngineError("the engine is shutting down", 50001)
        if req.echo:
            emit(Chunk(self.tokenizer.decode(tokens), n_prompt, 0))
        if max_new <= 0:
            emit(Chunk("", n_prompt, 0, "length"))
            emit(None)
            return
        seed = req.seed if req.seed is not None else self.default_seed
        sampler = (_SeededSampler(seed, req)
                   if seed is not None and req.temperature >= 1e-5 else None)
        seq = _Seq(req=req, tokens=tokens, max_new=max_new, cancel=cancel,
                   stop_ids=self.eos_ids | set(req.stop_token_ids), emit=emit,
                   stops=StopMatcher(list(req.stop)),
                   decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"),
                   procs=_request_processors(n_prompt, req, sampler))
        with self.cond:
            if self.closed:
                emit(EngineError("the engine is shutting down", 50001))
                return
            self.inbox.append(seq)
            self.cond.notify()

    # ---- token handling (scheduler or router thread; a request is in one place at a time) ----

    def _piece(self, seq: _Seq, token: int) -> bytes:
        # Decoding the whole suffix keeps SentencePiece's leading spaces right; the incremental
        # UTF-8 decoder below holds back a character split across tokens.
        before = self.tokenizer.decode(seq.generated[-8:-1]) if len(seq.generated) > 1 else ""
        after = self.tokenizer.decode(seq.generated[-8:])
        return after[len(before):].encode("utf-8") if after.startswith(before) else \
            self.tokenizer.decode([token]).encode("utf-8")

    def _take(self, seq: _Seq, token: int) -> None:
        n_prompt = len(seq.tokens)
        if seq.gone:
            self._finish(seq, "abort")
            return
        if token in seq.stop_ids:
            self._finish(seq, "stop")
            return
        assert seq.stops is not None
        seq.generated.append(token)
        text, hit = seq.stops.feed(seq.decoder.decode(self._piece(seq, token)))
        if hit:
            seq.emit(Chunk(text, n_prompt, len(seq.generated)))
            self._finish(seq, "stop", stop_hit=True)
            return
        if text:
            seq.emit(Chunk(text, n_prompt, len(seq.generated)))
        if len(seq.generated) >= seq.max_new:
            self._finish(seq, "length")

    def _finish(self, seq: _Seq, reason: str, stop_hit: bool = False) -> None:
        if seq.done:
            return
        seq.done = True
        tail = ""
        if not stop_hit and seq.stops is not None:
            tail, _ = seq.stops.feed(seq.decoder.decode(b"", final=True))
            tail += seq.stops.flush()
        seq.emit(Chunk(tail, len(seq.tokens), len(seq.generated), reason))
        seq.emit(None)

    # ---- the scheduler thread: solo generate(), or hand over to the batch manager ----

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.inbox:
                    self.cond.wait()
                if self.closed:
                    break
                seq = self.inbox.popleft()
                alone = not self.inbox
            if seq.gone:
                self._finish(seq, "abort")
                continue
            with self.batch_lock:
                alone = alone and not self.batch
            try:
                if alone:
                    self._solo(seq)
                if not seq.done:
                    self._to_batch(seq)
            except Exception as e:  # a failed request fails alone, never the thread
                log.exception("request %s failed", seq.req.request_id)
                seq.done = True
                seq.emit(EngineError(f"transformers failed: {type(e).__name__}: {e}", 50001))
        with self.cond:
            left = list(self.inbox)
        for seq in left:
            seq.emit(EngineError("the engine is shutting down", 50001))

    @torch.inference_mode()
    def _solo(self, seq: _Seq) -> None:
        req = seq.req
        # A seeded request draws with its own sampler (in seq.procs), then generate picks its draw.
        sample = req.temperature >= 1e-5 and not any(
            isinstance(p, _SeededSampler) for p in seq.procs)
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
            self._finish(seq, "abort")
        elif not seq.done and len(seq.generated) >= seq.max_new:
            self._finish(seq, "length")
        elif not seq.done and not self.inbox:
            self._finish(seq, "stop")  # generate ended on its own (an end token it stopped on)

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
        seq.cb_base = len(seq.generated)
        with self.batch_lock:
            self.batch[seq.rid] = seq
        rid = self.manager.add_request(
            seq.tokens + seq.generated, request_id=seq.rid, streaming=True,
            max_new_tokens=seq.max_new - len(seq.generated), eos_token_id=sorted(seq.stop_ids),
            temperature=float(max(req.temperature, GREEDY_TEMPERATURE)),
            top_p=float(req.top_p if req.temperature >= 1e-5 else 1.0),
            top_k=int(req.top_k if req.top_k > 0 else self.vocab_size))
        if rid is None:
            with self.batch_lock:
                self._leave(seq.rid)
            raise EngineError("the batch manager refused the request (stopping)", 50001)

    def _leave(self, rid: str) -> None:
        """A request leaves the batch (called with batch_lock held)."""
        self.batch.pop(rid, None)
        self.processors.wanted.pop(rid, None)

    # ---- the router thread: batch outputs -> requests ----

    def _route(self) -> None:
        while not self.closed:
            out = self.manager.get_result(timeout=0.1)
            with self.batch_lock:
                for rid, seq in list(self.batch.items()):
                    if seq.done or seq.gone:  # stopped here (stop string, cancel): end it there
                        self._leave(rid)
                        self.manager.cancel_request(rid)
                        self._finish(seq, "abort")
                if out is None:
                    if not self.manager.is_running() and self.batch and not self.closed:
                        err = self.manager.background_thread_status.fatal_error
                        for seq in self.batch.values():
                            seq.emit(EngineError(f"the batch manager stopped: {err}", 50001))
                        self.batch.clear()
                        self.processors.wanted.clear()
                    continue
                seq = self.batch.get(out.request_id)
            if seq is None:
                continue
            new = list(out.generated_tokens)[seq.cb_seen:]
            seq.cb_seen += len(new)
            for t in new:
                if not seq.done:
                    self._take(seq, int(t))
            if out.is_finished() or seq.done:
                with self.batch_lock:
                    self._leave(out.request_id)
                if out.error and not seq.done:
                    seq.done = True
                    seq.emit(EngineError(f"generation failed: {out.error}", 50001))
                elif not seq.done:
                    reached = len(seq.generated) >= seq.max_new
                    self._finish(seq, "length" if reached else "stop")
                if not out.is_finished():
                    self.manager.cancel_request(out.request_id)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "chat_template": self.chat_template.name,
                "parallel": self.parallel}

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        with contextlib.suppress(Exception):
            self.manager.stop(block=True, timeout=10)
        self.thread.join(timeout=10)
        with self.batch_lock:
            left = [seq for seq in self.batch.values() if not seq.done]
            self.batch.clear()
        for seq in left:  # their readers would wait forever otherwise
            seq.done = True
            seq.emit(EngineError("the engine is shutting down", 50001))


# ---- embeddings -----------------------------------------------------------------------------------


class EmbeddingEngine(Engine):
    """A sentence-embedding model: mean of the last hidden states over real tokens, L2-normed."""

    name = "transformers"
    BATCH = 32

    def __init__(self, path: Path, device: str, opts: LoadOptions) -> None:
        self.path, self.device = path, device
        self.truncate = opts.embed_truncate
        if opts.load_4bit or opts.load_8bit:
            log.warning("--load-8bit/--load-4bit ignored for an embedding model")
        dtype = DTYPES[opts.dtype] if opts.dtype else torch.float32
        check_memory(path, device, LoadOptions(dtype=opts.dtype), dtype.itemsize)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError, RuntimeError, KeyError, ImportError, TypeError) as e:
            raise _load_error(path, e) from e
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

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        raise EngineError("this is an embedding model; use /v1/embeddings", 40001)

    def generate(self, req: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        raise EngineError("this is an embedding model: it serves /v1/embeddings only", 40001)

    def supports_embeddings(self) -> bool:
        return True

    def dimensions(self) -> list[int]:
        return [self.dim]

    def _ids(self, item: str | list[int], i: int) -> list[int]:
        if isinstance(item, str):
            ids = list(self.tokenizer(item)["input_ids"])
        else:
            bad = [t for t in item if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise EngineError(f"input[{i}]: token id {bad[0]} is outside the vocabulary "
                                  f"(0..{self.tokenizer.vocab_size - 1})", 40302)
            ids = list(item)
        if not ids:
            raise EngineError(f"input[{i}] is empty", 40302)
        if len(ids) > self._n_ctx:
            if not self.truncate:
                raise EngineError(
                    f"input[{i}] has {len(ids)} tokens; this model takes at most {self._n_ctx} "
                    "(start the worker with --embed-in-truncate to cut longer inputs)", 40303)
            ids = ids[: self._n_ctx]
        return ids

    @torch.inference_mode()
    def embed(self, texts: list[Any]) -> tuple[list[list[float]], int]:
        rows = [self._ids(t, i) for i, t in enumerate(texts)]
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


__all__ = ["EmbeddingEngine", "LoadOptions", "TransformersEngine", "build", "check_flags",
           "count_parameters", "is_embedding_model", "parse_size"]
