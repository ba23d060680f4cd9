"""`llmrelay host`: declare models and load them on demand, within a memory budget.

    llmrelay host --models-dir ~/models --max-memory 12GiB
    llmrelay host --catalog models.toml --controller-address http://10.0.0.5:21001

`llmrelay up` starts one when its stack file has on-demand models or `--models-dir`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from llmrelay.config import split_csv
from llmrelay.ondemand.catalog import (
    CatalogError,
    ModelSpec,
    check_unique,
    loads_specs,
    read_catalog,
    scan_models_dir,
)
from llmrelay.ondemand.sizes import parse_budget, parse_duration
from llmrelay.protocol import DEFAULT_HEARTBEAT_INTERVAL

log = logging.getLogger("llmrelay.host")

ADMIN_KEY_ENV = "LLMRELAY_ADMIN_KEY"
DEFAULT_PORT = 21100


def add_host_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on, and where its workers listen (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--log-level", default=os.environ.get("LLMRELAY_LOG_LEVEL", "info"))
    p.add_argument("--ssl", action="store_true", help="serve HTTPS (SSL_KEYFILE, SSL_CERTFILE)")
    p.add_argument("--registration-token", default=None,
                   help="the cluster secret (default: env LLMRELAY_REGISTRATION_TOKEN)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let its workers finish their requests")
    p.add_argument("--controller-address", default="http://127.0.0.1:21001",
                   help="controller URL(s), comma-separated; its workers register there too")
    p.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL)
    p.add_argument("--models-dir", default=None,
                   help="every .gguf file and HF folder in it is a model, named after it")
    p.add_argument("--catalog", default=None,
                   help="a TOML file of [[model]] tables (the keys of a stack file's [[worker]])")
    p.add_argument("--models-json", default=None, help=argparse.SUPPRESS)  # from `llmrelay up`
    p.add_argument("--max-memory", default="0.8",
                   help="memory its models may take together: a size (12GiB) or a share of the "
                   "memory free at the first load (0.8, 80%%; GPU memory where there is a GPU)")
    p.add_argument("--admin-key", default=os.environ.get(ADMIN_KEY_ENV),
                   help="key for the admin endpoints (load, unload, list); default: env "
                   f"{ADMIN_KEY_ENV}; none: admin endpoints off")
    p.add_argument("--idle-unload", default=None,
                   help="unload a model unused this long (10m, 1h), unless it sets its own")
    p.add_argument("--keep-alive-max", default="1h",
                   help="the longest keep_alive a client may ask for (-1: no limit)")
    p.add_argument("--load-timeout", type=float, default=600.0,
                   help="seconds a model's worker may take to load")
    p.add_argument("--worker-log-dir", default=None,
                   help="keep each model's worker log in this folder as well")


def specs_from(args: argparse.Namespace) -> list[ModelSpec]:
    """The declared models from --models-json, --catalog and --models-dir (in that order)."""
    specs: list[ModelSpec] = []
    idle = parse_duration(args.idle_unload) if args.idle_unload else None
    if args.models_json:
        specs += loads_specs(args.models_json)
    if args.catalog:
        specs += read_catalog(args.catalog)
    if args.models_dir:
        specs += scan_models_dir(args.models_dir)
    for s in specs:
        if s.idle_unload is None and idle is not None:
            s.idle_unload = idle
    check_unique(specs)
    return specs


def run(args: argparse.Namespace) -> None:
    from llmrelay.config import setup_logging
    from llmrelay.ondemand.app import create_app
    from llmrelay.ondemand.host import HostService, HostSettings
    from llmrelay.runtime import serve, warn_public_bind
    from llmrelay.security import token_from
    from llmrelay.worker.main import default_worker_address

    setup_logging(args.log_level)
    try:
        specs = specs_from(args)
        parse_budget(args.max_memory)
        keep_max = parse_duration(args.keep_alive_max)
    except (CatalogError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not specs:
        sys.exit("error: no models declared: give --models-dir, --catalog, or on-demand models in "
                 "a stack file")
    controllers = split_csv(args.controller_address)
    token = token_from(args.registration_token, controllers[0] if controllers else None)
    warn_public_bind(args.host, "the host", protected=bool(token))
    address = default_worker_address(args.host, args.port, controllers[0] if controllers else "")
    settings = HostSettings(
        address=address, bind_host=args.host, controllers=controllers, token=token,
        heartbeat_interval=args.heartbeat_interval, max_memory=args.max_memory,
        keep_alive_max=keep_max, load_timeout=args.load_timeout,
        worker_log_dir=Path(args.worker_log_dir) if args.worker_log_dir else None,
        worker_shutdown=args.shutdown_timeout)
    admin_key = (args.admin_key or "").strip() or None
    if not admin_key:
        log.warning("no admin key (--admin-key / %s): the admin endpoints (load, unload, list) "
                    "are off", ADMIN_KEY_ENV)
    service = HostService(specs, settings)
    serve(create_app(service, token, admin_key), args.host, args.port, args.log_level, args.ssl,
          args.shutdown_timeout + 10)
