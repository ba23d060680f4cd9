"""The `openai` engine's options, from the worker's flags: a running upstream (`--upstream URL`)
or a server this worker starts (`--managed llama-cpp-server|vllm`, mapped to that server's own
flags by `worker/managed.py`). Nothing is started or asked here: `load` does that."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmrelay.config import split_csv
from llmrelay.worker import managed as mg
from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.models import ModelNotFound, ResolvedModel, resolve

log = logging.getLogger("llmrelay.worker")

KEY_ENV = "LLMRELAY_UPSTREAM_KEY"


@dataclass
class ManagedPlan:
    """The server to start before serving, and where it will answer."""

    server: str  # "llama-cpp-server" or "vllm"
    argv: list[str]
    port: int
    start_timeout: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@dataclass
class Options:
    base_url: str
    api_key: str | None = None
    names: list[str] = field(default_factory=list)  # empty: the upstream's own model ids
    upstream_model: str | None = None  # the model asked for, whatever the request names
    context_length: int | None = None
    timeout: float = 600.0  # seconds an upstream request may wait for data
    check_interval: float = 2.0  # seconds between looks at the upstream's model list
    managed: ManagedPlan | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: ResolvedModel | None) -> Options:
        key = args.upstream_key or os.environ.get(KEY_ENV)
        names = split_csv(args.model_names)
        common = dict(api_key=key, context_length=args.context_length,
                      timeout=args.upstream_timeout, check_interval=args.upstream_check_interval)
        if args.managed:
            if args.upstream:
                raise EngineError("give either --upstream (a running server) or --managed (a "
                                  "server this worker starts), not both")
            plan, names = managed_plan(args, names)
            return cls(base_url=plan.base_url, names=names,
                       upstream_model=args.upstream_model or names[0], managed=plan,
                       **common)  # type: ignore[arg-type]
        if not args.upstream:
            raise EngineError("--engine openai needs --upstream http://HOST:PORT/v1 (a running "
                              "OpenAI-compatible server) or --managed llama-cpp-server|vllm")
        return cls(base_url=args.upstream.rstrip("/"), names=names,
                   upstream_model=args.upstream_model, **common)  # type: ignore[arg-type]


def managed_plan(args: argparse.Namespace, names: list[str]) -> tuple[ManagedPlan, list[str]]:
    """The managed server's command line, and the public names (default: the model's)."""
    model_path = args.model_path
    default_name = Path(model_path.rstrip("/")).name or "model"
    try:
        found = resolve(model_path)
        model_path, default_name = str(found.path), found.default_name
        if args.managed == "llama-cpp-server" and found.kind != "gguf":
            raise EngineError(f"llama.cpp's server needs a .gguf file; {found.path} is an HF "
                              "folder (serve it with --managed vllm or the transformers engine)")
    except ModelNotFound:
        if args.managed == "llama-cpp-server":
            raise
        # vLLM loads hub ids and folders itself; a path that does not exist is its to refuse.
    names = names or [default_name]
    port = args.managed_port or mg.free_port()
    opts = mg.options_from_args(args, model_path, names, port)
    if args.managed == "vllm":
        try:
            argv = mg.vllm_argv(opts, mg.find_vllm())
        except mg.ManagedError as e:
            raise EngineError(str(e)) from e
        if args.max_gpu_memory:
            log.warning("--max-gpu-memory is not honoured by vLLM; use --gpu-memory-utilization")
    else:
        argv = mg.llamacpp_server_argv(opts)
        if args.gpu_memory_utilization is not None or args.tensor_parallel_size:
            log.warning("--gpu-memory-utilization/--tensor-parallel-size are vLLM flags; "
                        "llama.cpp's server ignores them")
    return ManagedPlan(args.managed, argv, port, args.managed_start_timeout), names
