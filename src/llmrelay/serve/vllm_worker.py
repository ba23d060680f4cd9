"""`python -m llmrelay.serve.vllm_worker`: FastChat's vLLM worker command, same flags.

vLLM's serving is not re-implemented: this starts vLLM's own OpenAI-compatible server
(`vllm serve`) as a managed child process and fronts it with the `openai` engine, so the
controller and API server see an ordinary worker. The seed's flags (`--model-path
--model-names --tensor-parallel-size --gpu-memory-utilization` plus the worker flags) are
mapped to vLLM's (`worker/managed.py: vllm_argv`); any other flag (a vLLM engine argument such
as `--max-model-len` or `--quantization`, as FastChat's vllm_worker accepted) is passed on to
`vllm serve` as it is. vLLM is an optional extra: without it the command says how to install it.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from llmrelay.config import add_worker_args
from llmrelay.worker.managed import ManagedError, find_vllm

# FastChat's vllm_worker admits this many requests at once: vLLM batches them itself.
DEFAULT_CONCURRENCY = 1024


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmrelay.serve.vllm_worker",
        description="An llmrelay worker in front of vLLM's own server (`vllm serve`), which it "
        "starts, watches and stops.")
    add_worker_args(parser, default_concurrency=DEFAULT_CONCURRENCY)
    args, rest = parser.parse_known_args(argv)
    args.engine = "openai"
    args.managed = "vllm"
    if rest:  # vLLM engine arguments: passed on as they are
        args.managed_args = " ".join(filter(None, [args.managed_args, shlex.join(rest)]))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        find_vllm()
    except ManagedError as e:
        sys.exit(f"error: {e}")
    from llmrelay.worker.main import run

    run(args)


if __name__ == "__main__":
    main()
