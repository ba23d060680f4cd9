"""The transformers engine's options, from the worker's flags, and what is decided before a
model loads: which flags this machine can honour (`check_flags`), whether the weights fit
(`check_memory`, estimated from the files' headers), and whether the model is an embedding
model. torch is imported inside the functions that need it, so reading this module costs none.

Flags: `--device cpu|cuda|mps` (default: the best present), `--num-gpus N` (layers spread over N
GPUs with accelerate's device_map), `--max-gpu-memory`, `--load-8bit` (bitsandbytes on CUDA;
torch's dynamic int8 quantization of the Linear layers on CPU, as FastChat allows),
`--load-4bit` (bitsandbytes, CUDA only), `--dtype`. A model that does not fit is refused with
both figures and the flag that would help.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.models import ResolvedModel
from llmrelay.worker.templates import KNOWN

if TYPE_CHECKING:
    import torch

log = logging.getLogger("llmrelay.worker")

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # --dtype
BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class Options:
    path: Path
    device: str | None = None  # None: the best present (from_args resolves it)
    num_gpus: int | None = None
    max_gpu_memory: str | None = None
    load_8bit: bool = False
    load_4bit: bool = False
    dtype: str | None = None
    cpu_offloading: bool = False
    context_length: int | None = None
    chat_template: str | None = None
    parallel: int | None = None  # requests batched together: every admitted request
    seed: int | None = None
    n_threads: int | None = None
    embed_truncate: bool = False  # --embed-in-truncate: cut embedding inputs that are too long

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: ResolvedModel | None) -> Options:
        """The options for the worker's flags, the device resolved (refusing flags this machine
        cannot honour; needs torch)."""
        if model is None:
            raise EngineError("the transformers engine needs --model-path (an HF folder or a GGUF "
                              "file)")
        template = args.chat_template
        if template is None and args.conv_template and args.conv_template in KNOWN:
            template = args.conv_template
        opts = cls(path=model.path, device=args.device, num_gpus=args.num_gpus,
                   max_gpu_memory=args.max_gpu_memory, load_8bit=args.load_8bit,
                   load_4bit=args.load_4bit, dtype=args.dtype, cpu_offloading=args.cpu_offloading,
                   context_length=args.context_length, chat_template=template,
                   parallel=args.limit_worker_concurrency + getattr(args, "fair_reserve", 0),
                   seed=args.seed,
                   n_threads=args.n_threads, embed_truncate=args.embed_in_truncate)
        opts.device = check_flags(opts)
        return opts


def torch_dtype(name: str | None, default: str) -> torch.dtype:
    """--dtype (or `default`) as torch's dtype."""
    import torch

    return getattr(torch, name or default)  # type: ignore[no-any-return]


def load_error(path: Path, e: Exception) -> EngineError:
    return EngineError(f"transformers could not load {path}: {type(e).__name__}: {e}")


def parse_size(text: str) -> int:
    """'12GiB', '12GB', '800MiB', '12' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise EngineError(f"--max-gpu-memory {text!r} is not a size; write e.g. 12GiB or 800MiB")
    unit = (m.group(2) or "GiB").upper().rstrip("B")
    power = {"K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if unit.endswith("I") or len(unit) == 1 else 1000
    return int(float(m.group(1)) * base**power)


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_flags(opts: Options) -> str:
    """The device to load on, after refusing the flags this machine cannot honour."""
    import torch

    gpus = cuda_count()
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
        import torch

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


def check_memory(path: Path, device: str, opts: Options, default_bytes: int) -> None:
    """Refuse, before loading, a model whose weights would not fit (with 20% headroom)."""
    try:
        n, _ = count_parameters(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise EngineError(f"transformers could not load {path}: its weight files are unreadable "
                          f"({type(e).__name__}: {e})") from e
    per = 0.5 if opts.load_4bit else 1.0 if opts.load_8bit else DTYPE_BYTES[opts.dtype] \
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
    if device == "cuda" and (opts.num_gpus or 1) < cuda_count():
        hints.append(f"--num-gpus {cuda_count()} (spread the layers over every GPU)")
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
