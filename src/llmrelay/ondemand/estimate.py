"""How much memory a model will take once loaded, before any process loads it, and how much this
host may give its on-demand models (`--max-memory`).

Estimates are read from the files and the worker's flags, without a model library:
- a GGUF file on llama.cpp: the file (its weights, as stored) + the KV cache, in f16, of
  `context_length` tokens for each of `limit_worker_concurrency` sequences (the engine gives
  every admitted request its own stream of cells) + the process and llama.cpp's compute
  buffers;
- an HF folder on transformers: the parameters (safetensors headers) at the bytes per parameter
  the flags ask for, + 20% (as the engine's own check), + the batch manager's paged KV cache
  (sized as the engine sizes it) twice over for the batch's activations, + the process with
  torch;
- an upstream server (`--engine openai`): only the worker process.

Measured on CPU with the bundled models the estimates are within about 10% of the worker's
resident memory after its first answer (docs/on-demand.md). Where there is a GPU (nvidia-smi
answers), the budget is GPU memory and the estimate counts what goes there (weights, cache, a
CUDA context) instead of the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmrelay.ondemand.catalog import ModelSpec, worker_args
from llmrelay.ondemand.gguf import GGUFError, read_info
from llmrelay.ondemand.sizes import MiB, fmt_bytes, parse_budget

log = logging.getLogger("llmrelay.host")

LLAMACPP_MAX_CONTEXT = 8192  # the llamacpp engine's default context cap (engine.DEFAULT_MAX_CONTEXT)
HF_KV_BUDGET = 1024**3  # the transformers engine's paged cache cap (engine.KV_CACHE_BUDGET)
HF_PAGE_TOKENS = 2048  # ... sized for this many tokens per request
OVERHEAD_CPU = {"llamacpp": 160 * MiB, "transformers": 450 * MiB, "openai": 120 * MiB}
OVERHEAD_GPU = 512 * MiB  # a CUDA context and compute buffers, per process
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class EstimateError(ValueError):
    """The model's files cannot be read well enough to estimate it (damaged, not a model)."""


@dataclass
class Estimate:
    total: int
    parts: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes)
    engine: str = ""
    tokens: int = 0  # KV cache tokens per sequence
    sequences: int = 0
    kv_per_token: int = 0  # bytes, all layers
    fixed: int = 0  # what does not depend on the context length

    def describe(self) -> str:
        return " + ".join(f"{what} {fmt_bytes(n)}" for what, n in self.parts)

    def context_that_fits(self, capacity: int) -> int | None:
        """The largest power-of-two context length (at least 256) that would fit, if any."""
        if not self.kv_per_token or not self.sequences:
            return None
        room = capacity - self.fixed
        if room <= 0:
            return None
        tokens = room // (self.kv_per_token * self.sequences)
        if tokens < 256:
            return None
        return min(1 << int(math.log2(tokens)), self.tokens)


def _gguf(spec: ModelSpec, args: argparse.Namespace, gpu: bool) -> Estimate:
    path = Path(spec.path)
    try:
        info = read_info(path)
    except GGUFError as e:
        raise EstimateError(str(e)) from e
    layers = int(info.arch("block_count", 0) or 0)
    heads = int(info.arch("attention.head_count", 1) or 1)
    kv_heads = int(info.arch("attention.head_count_kv", heads) or heads)
    embd = int(info.arch("embedding_length", 0) or 0)
    k = int(info.arch("attention.key_length", 0) or (embd // heads if heads else 0))
    v = int(info.arch("attention.value_length", 0) or k)
    trained = int(info.arch("context_length", 0) or 0)
    n_ctx = args.context_length or LLAMACPP_MAX_CONTEXT
    if not args.context_length and 0 < trained < n_ctx:
        n_ctx = trained
    seqs = max(1, args.limit_worker_concurrency)
    per_token = 2 * layers * kv_heads * (k + v)  # f16 keys and values
    weights = sum(p.stat().st_size for p in _parts(path))
    overhead = OVERHEAD_GPU if gpu else OVERHEAD_CPU["llamacpp"]
    cache = per_token * n_ctx * seqs
    return Estimate(weights + cache + overhead,
                    [("weights", weights), (f"KV cache ({n_ctx} tokens x {seqs} sequences)", cache),
                     ("process" if not gpu else "CUDA context", overhead)],
                    "llamacpp", n_ctx, seqs, per_token, weights + overhead)


def _parts(path: Path) -> list[Path]:
    """A split GGUF's parts (name-00001-of-00003.gguf ...), or the file alone."""
    m = re.search(r"-0*1-of-(\d+)$", path.stem)
    if not m:
        return [path]
    stem = path.stem[:m.start()]
    return sorted(path.parent.glob(f"{stem}-*-of-{m.group(1)}.gguf")) or [path]


def _hf_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EstimateError(f"{path}/config.json cannot be read: {e}") from e
    return cfg.get("text_config") or cfg


def _hf(spec: ModelSpec, args: argparse.Namespace, gpu: bool) -> Estimate:
    from llmrelay.worker.engines.hf.options import count_parameters, is_embedding_model

    path = Path(spec.path)
    try:
        if path.is_file():
            n = read_info(path).elements
        else:
            n, _ = count_parameters(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EstimateError(f"the weights of {path} cannot be read ({type(e).__name__}: {e})") from e
    default = 2 if gpu else 4
    per = 0.5 if args.load_4bit else 1.0 if args.load_8bit else \
        DTYPE_BYTES[args.dtype] if args.dtype else default
    weights = int(n * per * 1.2)
    overhead = OVERHEAD_GPU if gpu else OVERHEAD_CPU["transformers"]
    parts = [(f"weights ({n / 1e6:.0f}M parameters x {per:g} bytes + 20%)", weights)]
    if path.is_file() or is_embedding_model(path):
        parts.append(("process" if not gpu else "CUDA context", overhead))
        return Estimate(weights + overhead, parts, "transformers", fixed=weights + overhead)
    cfg = _hf_config(path)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 64) // heads)
    layers = int(cfg.get("num_hidden_layers") or 1)
    trained = int(cfg.get("max_position_embeddings") or 2048)
    n_ctx = min(args.context_length, trained) if args.context_length else trained
    seqs = max(1, args.limit_worker_concurrency)
    kv_bytes = 4 if per == 4 else 2
    per_token = 2 * layers * kv_heads * head_dim * kv_bytes
    tokens = max(n_ctx, min(seqs * min(n_ctx, HF_PAGE_TOKENS), HF_KV_BUDGET // per_token))
    cache = 2 * tokens * per_token  # the paged cache and the batch's activations
    parts += [(f"KV cache and activations ({tokens} tokens)", cache),
              ("process" if not gpu else "CUDA context", overhead)]
    est = Estimate(weights + cache + overhead, parts, "transformers", fixed=weights + overhead)
    return est


def estimate(spec: ModelSpec, gpu: bool = False) -> Estimate:
    """The memory `spec` will take once loaded (EstimateError if its files are unreadable)."""
    from llmrelay.worker import engines
    from llmrelay.worker.models import ResolvedModel

    args = worker_args(spec)
    if args.engine == "auto" and (args.upstream or args.managed):
        args.engine = "openai"
    if args.engine in ("openai", "synthetic"):
        return Estimate(OVERHEAD_CPU["openai"], [("process", OVERHEAD_CPU["openai"])], args.engine,
                        fixed=OVERHEAD_CPU["openai"])
    name = engines.choose(args.engine, ResolvedModel(Path(spec.path), spec.kind, spec.name))
    return _gguf(spec, args, gpu) if name == "llamacpp" else _hf(spec, args, gpu)


# ---- what this host has -----------------------------------------------------------------------


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes over the visible NVIDIA GPUs, from nvidia-smi; None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,memory.free,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    allowed = {v.strip() for v in visible.split(",")} if visible else None
    free = total = 0
    for line in out.strip().splitlines():
        try:
            index, f, t = (x.strip() for x in line.split(","))
            if allowed is None or index in allowed:
                free += int(f) * MiB
                total += int(t) * MiB
        except ValueError:
            continue
    return (free, total) if total else None


def ram_available() -> int:
    try:
        text = Path("/proc/meminfo").read_text()
        m = re.search(r"MemAvailable:\s+(\d+)", text)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 0


class Budget:
    """What this host may give its models: `--max-memory` as a size, or as a share of the memory
    free when it is first needed (then fixed, so plans do not move with other programs)."""

    def __init__(self, flag: str = "0.8", gpu: bool | None = None,
                 free: Callable[[], int] | None = None) -> None:
        self.flag = str(flag)
        self.size, self.fraction = parse_budget(flag)
        found = gpu_memory() if gpu is None or gpu else None
        self.gpu = found is not None if gpu is None else gpu
        self._free = free or ((lambda: (gpu_memory() or (0, 0))[0]) if self.gpu else ram_available)
        self._capacity: int | None = self.size

    @property
    def where(self) -> str:
        return "GPU memory" if self.gpu else "memory"

    def capacity(self) -> int:
        if self._capacity is None:
            assert self.fraction is not None
            self._capacity = int(self._free() * self.fraction)
        return self._capacity

    def describe(self) -> str:
        cap = fmt_bytes(self.capacity())
        if self.size is not None:
            return f"{cap} of {self.where} (--max-memory {self.flag})"
        return f"{cap} ({self.fraction:.0%} of the {self.where} free at the first load; --max-memory)"
