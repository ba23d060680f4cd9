"""`llmrelay`: the project's own CLI (controller, worker, api, host, up, models, pull, chat,
status, keys, usage).
Nothing imports this module."""

from __future__ import annotations

import argparse
import sys

from llmrelay import __version__, lifeline
from llmrelay.config import add_api_args, add_controller_args, add_registry_args, add_worker_args


def main(argv: list[str] | None = None) -> None:
    lifeline.hold()  # a child of `llmrelay up` ends with it, even if `up` is killed -9
    parser = argparse.ArgumentParser(
        prog="llmrelay", description="Serve many local LLMs behind one OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"llmrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("controller", help="run the controller (worker registry)")
    add_controller_args(p)
    p = sub.add_parser("worker", help="run a model worker")
    add_worker_args(p)
    p = sub.add_parser("api", help="run the OpenAI-compatible API server")
    add_api_args(p)
    p = sub.add_parser("up", help="run a whole stack (controller, workers, API) from a stack file")
    p.add_argument("stack", nargs="?", default=None,
                   help="stack file (TOML); default: the bundled model on 127.0.0.1:8000")
    p.add_argument("--log-dir", default=None, help="where to keep each process's log "
                   "(default: the stack file's log_dir, else ./logs)")
    p.add_argument("--models-dir", default=None, help="also declare every .gguf file and HF "
                   "folder in this folder, loaded on demand (see docs/on-demand.md)")
    p = sub.add_parser("host", help="declare models and load them on demand within a memory "
                       "budget (one worker process per model)")
    from llmrelay.ondemand.main import add_host_args
    add_host_args(p)
    p = sub.add_parser("models", help="list, load, unload or pin models on demand (a host's admin "
                       "endpoints); list also shows the models in the Hugging Face cache")
    from llmrelay.ondemand.admin_cli import add_args as add_models_args
    add_models_args(p)
    p = sub.add_parser("pull", help="fetch a model from the Hugging Face hub into its cache "
                       "(ORG/NAME[:QUANT]), ahead of serving it")
    from llmrelay.pull_cli import add_args as add_pull_args
    add_pull_args(p)
    p = sub.add_parser("chat", help="chat in the terminal with any OpenAI-compatible server")
    from llmrelay.chat_cli import add_args as add_chat_args
    add_chat_args(p)
    p = sub.add_parser("status", help="show the controller's workers: models, addresses, queues, "
                       "health (with --registry: the NATS nodes, controllers, API servers too)")
    p.add_argument("--controller-address", default="http://127.0.0.1:21001",
                   help="controller URL (the first of a comma-separated list)")
    p.add_argument("--registration-token", default=None,
                   help="the cluster's registration token, if it has one "
                   "(default: env LLMRELAY_REGISTRATION_TOKEN)")
    add_registry_args(p)

    from llmrelay.keys_cli import add_keys_args, add_usage_args
    p = sub.add_parser("keys", help="manage the API keys file (keys add NAME ...)")
    add_keys_args(p)
    p = sub.add_parser("usage", help="show usage per day, key and model (needs an admin key)")
    add_usage_args(p)
    p = sub.add_parser("batch", help="run a JSONL of requests through an API server's Batch API "
                       "(batch run requests.jsonl -o results.jsonl)")
    from llmrelay.batch_cli import add_args as add_batch_args
    add_batch_args(p)

    args = parser.parse_args(argv)
    if args.command == "controller":
        from llmrelay.controller.app import run
    elif args.command == "worker":
        from llmrelay.worker.main import run
    elif args.command == "api":
        from llmrelay.api.app import run
    elif args.command == "up":
        from llmrelay.launcher import run
    elif args.command == "host":
        from llmrelay.ondemand.main import run
    elif args.command == "models":
        from llmrelay.ondemand.admin_cli import run
    elif args.command == "pull":
        from llmrelay.pull_cli import run
    elif args.command == "chat":
        from llmrelay.chat_cli import run
    elif args.command == "status" and args.registry:
        from llmrelay.registry.clusterstatus import run
    elif args.command == "status":
        from llmrelay.status import run
    elif args.command == "keys":
        from llmrelay.keys_cli import run_keys as run
    elif args.command == "usage":
        from llmrelay.keys_cli import run_usage as run
    elif args.command == "batch":
        from llmrelay.batch_cli import run
    else:
        parser.print_help()
        sys.exit(2)
    run(args)


if __name__ == "__main__":
    main()
