"""Start a model worker from its flags: resolve the model (fetching a hub name first, with its
progress in the log and in a `downloading` registration: download.py), check the flags, load,
serve.

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
from llmrelay.registry.base import RegistryConfig, RegistryError
from llmrelay.runtime import PUBLIC_HOSTS
from llmrelay.security import token_from
from llmrelay.worker import engines
from llmrelay.worker.download import Announcer
from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.models import ModelNotFound, ResolvedModel, hub_ref, resolve

log = logging.getLogger("llmrelay.worker")


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


def run(args: argparse.Namespace) -> None:
    from llmrelay.config import setup_logging
    from llmrelay.runtime import serve, warn_public_bind
    from llmrelay.worker.app import WorkerSettings, create_app

    setup_logging(args.log_level)
    if args.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    controllers = split_csv(args.controller_address)
    try:
        registry = RegistryConfig.from_args(args)
    except RegistryError as e:
        sys.exit(f"error: {e}")
    # the outward address is the one that reaches the registry (the controller, or NATS)
    reach = registry.servers[0].replace("nats://", "http://").replace("tls://", "http://") \
        if registry is not None else (controllers[0] if controllers else "")
    address = args.worker_address or default_worker_address(args.host, args.port, reach)
    if args.limit_worker_concurrency < 1:
        sys.exit("error: --limit-worker-concurrency must be at least 1")
    if args.fair_reserve < 0:
        sys.exit("error: --fair-reserve must be 0 or more")
    if args.fair_sharing == "off":
        args.fair_reserve = 0  # the engines size their batch by it (limit + reserve)
    errors, warnings = fastchat_flags.check(args)  # GPTQ/AWQ/exllama/xft, --revision
    for w in warnings:
        log.warning("%s", w)
    if errors:
        for e in errors:
            log.error("cannot start the worker: %s", e)
        sys.exit(2)
    if args.engine == "auto" and (args.upstream or args.managed):
        args.engine = "openai"
    token = token_from(args.registration_token, None if args.no_register or not controllers
                       or registry is not None else controllers[0])
    names = split_csv(args.model_names)
    announcer = Announcer(controllers if registry is None and not args.no_register else [],
                          address, token, names or [_hub_name(args.model_path)])
    try:
        model = _model(args, announcer) if args.engine in engines.NEEDS_MODEL | {"auto"} else None
        name = engines.choose(args.engine, model)
        if args.kv_cache and name != "llamacpp":
            log.warning("--kv-cache is a llamacpp engine setting; the %s engine ignores it", name)
        if getattr(args, "speculative", "off") != "off" and name != "llamacpp":
            log.warning("--speculative is a llamacpp engine setting; the %s engine ignores it",
                        name)
        log.info("loading %s from %s ...", ", ".join(names or [model.default_name if model
                                                                else name]),
                 model.path if model else (args.upstream or args.managed or "nothing"))
        started = time.monotonic()
        engine = engines.build(name, args, model)
        names = names or engine.served_names() or [model.default_name if model else name]
    except (ModelNotFound, EngineError, ValueError) as e:
        announcer.stop(deregister=True)
        log.error("cannot start the worker: %s", e)
        sys.exit(2)
    announcer.handover()
    log.info("model ready in %.1f s", time.monotonic() - started)
    # `token`: with no flag or variable, the token of the `llmrelay up` stack at the controller.
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
        fair_sharing=args.fair_sharing != "off",
        fair_reserve=args.fair_reserve,
        reasoning_parser=args.reasoning_parser,
    )
    serve(create_app(engine, settings, registry), args.host, args.port, args.log_level, args.ssl,
          args.shutdown_timeout)


def _hub_name(model_path: str) -> str:
    ref = hub_ref(model_path)
    return ref.name if ref is not None else model_path


def _model(args: argparse.Namespace, announcer: Announcer) -> ResolvedModel:
    """`--model-path` resolved; a hub name is fetched first, its progress logged and announced."""
    from llmrelay.worker import download, hub

    ref = hub_ref(args.model_path)
    if ref is None:
        if args.revision not in (None, "main"):
            raise ModelNotFound(f"--revision {args.revision} applies to a model's name on the hub "
                                f"(ORG/NAME); {args.model_path!r} is not one")
        if args.revision == "main":
            log.warning("--revision main ignored: %s is not a name on the hub", args.model_path)
        return resolve(args.model_path)
    download.progress_bars()
    log.info("resolving %s%s on %s (cache: %s)", ref, f" at {args.revision}" if args.revision
             else "", hub.where(), hub.cache_dir())
    lines = hub.LogProgress(str(ref))

    def report(p: hub.Progress) -> None:
        lines(p)
        announcer.update(p)

    return resolve(args.model_path, args.revision, report)
