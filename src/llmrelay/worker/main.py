"""Start a model worker from its flags: resolve the model, check the flags, load, serve.

Flags an engine cannot honour give a clear error (when the user's intent cannot be met, e.g.
`--device cuda` without a GPU) or a warning (when ignoring them is harmless, e.g. `--num-gpus 1`
on a CPU-only machine, which is what the seed's start script passes).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from urllib.parse import urlparse

from llmrelay import fastchat_flags
from llmrelay.config import split_csv
from llmrelay.runtime import PUBLIC_HOSTS
from llmrelay.security import token_from
from llmrelay.worker.engines.base import Engine, EngineError
from llmrelay.worker.models import ModelNotFound, ResolvedModel, resolve
from llmrelay.worker.templates import KNOWN

log = logging.getLogger("llmrelay.worker")


class FlagError(Exception):
    """A flag this worker cannot honour; the message says what to do instead."""


def default_worker_address(host: str, port: int, controller: str) -> str:
    """http://HOST:PORT, or, when listening everywhere, the address that reaches the controller."""
    if host not in PUBLIC_HOSTS:
        return f"http://{host}:{port}"
    target = urlparse(controller).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            ip = s.getsockname()[0]
    except OSError:
        ip = "127.0.0.1"
    return f"http://{ip}:{port}"


def check_llamacpp_flags(args: argparse.Namespace, gpu: bool) -> str:
    """The device to use, after warning about or refusing flags llama.cpp cannot honour."""
    device = args.device
    if device is None:
        device = "cuda" if gpu else "cpu"
        if not gpu and (args.num_gpus or 0) > 0:
            log.warning("--num-gpus %s: no GPU support in this llama.cpp build; running on CPU",
                        args.num_gpus)
    elif device in ("cuda", "mps", "xpu", "npu") and not gpu:
        raise FlagError(
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


def build_engine(args: argparse.Namespace, model: ResolvedModel | None) -> Engine:
    engine = args.engine
    if engine == "synthetic":  # fixed text, no model: router benchmarks and fault tests only
        from llmrelay.worker.engines.synthetic import SyntheticEngine

        log.warning("--engine synthetic: this worker serves NO model and answers fixed text; "
                    "it exists for router benchmarks and fault tests only")
        return SyntheticEngine(args.chat_template)
    if engine == "openai":  # any OpenAI-compatible server, running or started here (managed)
        from llmrelay.worker.engines import openai as upstream

        return upstream.build(args, split_csv(args.model_names))
    assert model is not None
    if engine == "auto":
        engine = "llamacpp" if model.kind == "gguf" else "transformers"
    if args.kv_cache and engine != "llamacpp":
        log.warning("--kv-cache is a llamacpp engine setting; the %s engine ignores it", engine)
    if engine == "llamacpp":
        if model.kind != "gguf":
            raise FlagError(f"the llamacpp engine needs a .gguf file; {model.path} is an HF folder")
        from llmrelay.worker.engines.llamacpp import LlamaCppEngine, gpu_available

        device = check_llamacpp_flags(args, gpu_available())
        template = args.chat_template
        if template is None and args.conv_template:
            if args.conv_template in KNOWN:
                template = args.conv_template
            else:
                log.warning("--conv-template %s is a FastChat template name we do not know; "
                            "using the model's own chat template (see --chat-template)",
                            args.conv_template)
        return LlamaCppEngine(
            model.path,
            device=device,
            context_length=args.context_length,
            n_threads=args.n_threads,
            chat_template=template,
            seed=args.seed,
            parallel=args.limit_worker_concurrency,  # every admitted request decodes together
            kv_cache=args.kv_cache or "per-sequence",
        )
    if engine == "transformers":
        try:
            from llmrelay.worker.engines import transformers as hf
        except ImportError as e:
            raise FlagError(
                f"the transformers engine needs torch and transformers ({e}): install them with "
                "`pip install torch` then `pip install 'llmrelay[transformers]'`") from e
        template = args.chat_template
        if template is None and args.conv_template and args.conv_template in KNOWN:
            template = args.conv_template
        return hf.build(model.path, hf.LoadOptions(
            device=args.device, num_gpus=args.num_gpus, max_gpu_memory=args.max_gpu_memory,
            load_8bit=args.load_8bit, load_4bit=args.load_4bit, dtype=args.dtype,
            cpu_offloading=args.cpu_offloading, context_length=args.context_length,
            chat_template=template, parallel=args.limit_worker_concurrency, seed=args.seed,
            n_threads=args.n_threads, embed_truncate=args.embed_in_truncate))
    raise FlagError(
        f"the {engine} engine is not available in this version of llmrelay; serve a .gguf "
        "file with the llamacpp engine"
    )


def run(args: argparse.Namespace) -> None:
    from llmrelay.config import setup_logging
    from llmrelay.runtime import serve, warn_public_bind
    from llmrelay.worker.app import WorkerSettings, create_app

    setup_logging(args.log_level)
    if args.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    controllers = split_csv(args.controller_address)
    address = args.worker_address or default_worker_address(
        args.host, args.port, controllers[0] if controllers else "")
    if args.limit_worker_concurrency < 1:
        sys.exit("error: --limit-worker-concurrency must be at least 1")
    errors, warnings = fastchat_flags.check(args)  # GPTQ/AWQ/exllama/xft, --revision
    for w in warnings:
        log.warning("%s", w)
    if errors:
        for e in errors:
            log.error("cannot start the worker: %s", e)
        sys.exit(2)
    if args.engine == "auto" and (args.upstream or args.managed):
        args.engine = "openai"
    try:
        model = None if args.engine in ("synthetic", "openai") else resolve(args.model_path)
        names = split_csv(args.model_names) or [model.default_name if model else args.engine]
        log.info("loading %s from %s ...", ", ".join(names), model.path if model else (
            args.upstream or args.managed or "nothing"))
        started = time.monotonic()
        engine = build_engine(args, model)
        if args.engine == "openai":
            names = engine.public_names()  # type: ignore[attr-defined]
    except (ModelNotFound, FlagError, EngineError, ValueError) as e:
        log.error("cannot start the worker: %s", e)
        sys.exit(2)
    log.info("model ready in %.1f s", time.monotonic() - started)
    # With no flag or variable, the token of the `llmrelay up` stack at the controller, if any.
    token = token_from(args.registration_token,
                       None if args.no_register or not controllers else controllers[0])
    warn_public_bind(args.host, "the worker", protected=bool(token))
    settings = WorkerSettings(
        worker_address=address,
        model_names=names,
        controller_addresses=controllers,
        limit_worker_concurrency=args.limit_worker_concurrency,
        stream_interval=max(1, args.stream_interval),
        heartbeat_interval=args.heartbeat_interval,
        register=not args.no_register,
        token=token,
        max_queue=args.max_queue,
    )
    try:
        serve(create_app(engine, settings), args.host, args.port, args.log_level, args.ssl,
              args.shutdown_timeout)
    finally:
        engine.close()
