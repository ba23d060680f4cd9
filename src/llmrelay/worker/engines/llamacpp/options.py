"""The llama.cpp engine's options, from the worker's flags."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.engines.llamacpp.speculate import Settings as Speculation
from llmrelay.worker.models import ModelNotFound, ResolvedModel, resolve
from llmrelay.worker.templates import KNOWN

log = logging.getLogger("llmrelay.worker")

KV_CACHE_LAYOUTS = ("per-sequence", "unified")  # --kv-cache


@dataclass
class Options:
    path: Path
    device: str = "cpu"
    context_length: int | None = None
    n_threads: int | None = None
    chat_template: str | None = None
    seed: int | None = None
    parallel: int | None = None  # sequences decoded together: every admitted request
    kv_cache: str = "per-sequence"
    prefill_slowdown: float = 2.0  # prefill.py: a step with prompt rows vs decode rows alone
    speculation: Speculation = Speculation()  # speculate.py: --speculative and its sizes
    mmproj: Path | None = None  # a vision model's projector GGUF (vision.py)

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: ResolvedModel | None) -> Options:
        import llama_cpp  # here: reading the flags of another engine needs no llama.cpp

        if model is None or model.kind != "gguf":
            where = model.path if model else args.model_path
            raise EngineError(f"the llamacpp engine needs a .gguf file; {where} is an HF folder")
        template = args.chat_template
        if template is None and args.conv_template:
            if args.conv_template in KNOWN:
                template = args.conv_template
            else:
                log.warning("--conv-template %s is a FastChat template name we do not know; "
                            "using the model's own chat template (see --chat-template)",
                            args.conv_template)
        return cls(path=model.path, device=check_flags(args, bool(llama_cpp.llama_supports_gpu_offload())),
                   context_length=args.context_length, n_threads=args.n_threads,
                   chat_template=template, seed=args.seed,
                   parallel=args.limit_worker_concurrency + getattr(args, "fair_reserve", 0),
                   kv_cache=args.kv_cache or "per-sequence",
                   prefill_slowdown=getattr(args, "prefill_slowdown", None) or 2.0,
                   speculation=speculation(args), mmproj=projector(args, model.path))


def projector(args: argparse.Namespace, model: Path) -> Path | None:
    """--mmproj (refused when it is no file), else an `mmproj*.gguf` file next to the model (the
    first by name when there are several)."""
    given = getattr(args, "mmproj", None)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise EngineError(f"--mmproj: no such file: {path}")
        return path
    found = sorted(p for p in model.parent.glob("mmproj*.gguf") if p.is_file() and p != model)
    if len(found) > 1:
        log.warning("several projectors next to %s; using %s (choose one with --mmproj)",
                    model.name, found[0].name)
    if found:
        log.info("found the projector %s next to the model", found[0].name)
    return found[0] if found else None


def speculation(args: argparse.Namespace) -> Speculation:
    """--speculative and its sizes, checked (EngineError when they make no sense)."""
    draft = getattr(args, "draft_model_path", None)
    spec = Speculation(getattr(args, "speculative", None) or "off",
                       getattr(args, "num_speculative_tokens", None) or Speculation.tokens,
                       getattr(args, "ngram_min", None) or Speculation.ngram_min,
                       getattr(args, "ngram_max", None) or Speculation.ngram_max,
                       Path(draft) if draft else None)
    wrong = spec.check()
    if wrong:
        raise EngineError(wrong)
    if draft:  # a GGUF file, a bundled alias, or a hub name already in the cache
        try:
            model = resolve(draft, fetch=False)
        except ModelNotFound as e:
            raise EngineError(f"--draft-model-path: {e}") from e
        if model.kind != "gguf":
            raise EngineError(f"--draft-model-path: the llamacpp engine needs a .gguf file; "
                              f"{model.path} is an HF folder")
        spec = replace(spec, draft_model=model.path)
    return spec


def check_flags(args: argparse.Namespace, gpu: bool) -> str:
    """The device to use, after warning about or refusing flags llama.cpp cannot honour."""
    device = args.device
    if device is None:
        device = "cuda" if gpu else "cpu"
        if not gpu and (args.num_gpus or 0) > 0:
            log.warning("--num-gpus %s: no GPU support in this llama.cpp build; running on CPU",
                        args.num_gpus)
    elif device in ("cuda", "mps", "xpu", "npu") and not gpu:
        raise EngineError(
            f"--device {device}: this llama.cpp build has no GPU support. Use --device cpu, or "
            "reinstall llama-cpp-python with GPU support (CMAKE_ARGS=-DGGML_CUDA=on)."
        )
    if args.max_gpu_memory:
        log.warning("--max-gpu-memory is not honoured by the llamacpp engine (llama.cpp sizes "
                    "its buffers from the model and --context-length)")
    if args.load_8bit or args.load_4bit:
        log.warning("--load-8bit/--load-4bit have no effect on a GGUF model: it is already "
                    "quantized (pick a GGUF of the precision you want)")
    if args.dtype:
        log.warning("--dtype has no effect on a GGUF model: its tensors keep their stored types")
    if args.cpu_offloading:
        log.warning("--cpu-offloading has no effect on the llamacpp engine")
    if args.num_gpus and args.num_gpus > 1 and gpu:
        log.info("llama.cpp spreads layers over all visible GPUs; set --gpus to choose them")
    return device
