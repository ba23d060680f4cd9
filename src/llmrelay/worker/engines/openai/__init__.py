"""The `openai` engine: a worker in front of any OpenAI-compatible server.

`vllm serve`, llama.cpp's server, Ollama, another llmrelay: anything with `/v1/models`,
`/v1/chat/completions`, `/v1/completions` (and maybe `/v1/embeddings`) can sit behind our
controller, running elsewhere (`--upstream URL`) or started here as this worker's child process
(`--managed llama-cpp-server|vllm`, worker/managed.py).

- `options.py`: the flags -> `Options` (nothing started or asked).
- `startup.py`: what `load` does before the worker serves, blocking: start the managed server and
  wait until it answers; read the upstream's model ids when `--model-names` gives no names.
- `engine.py`: the engine, on the worker's event loop through the `openai` SDK's `AsyncOpenAI`
  (made in `start`); `calls.py` turns a generation into SDK arguments and reads the answers;
  `errors.py` keeps upstream errors' meaning (`map_error`); `health.py` watches the upstream;
  `tokens.py` counts tokens when the upstream's answers do not say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrelay.worker.engines.openai.errors import map_error
from llmrelay.worker.engines.openai.options import KEY_ENV, ManagedPlan, Options

if TYPE_CHECKING:
    from llmrelay.worker.engines.openai.engine import OpenAIEngine

__all__ = ["KEY_ENV", "ManagedPlan", "Options", "load", "map_error"]


def load(options: Options) -> OpenAIEngine:
    """Start the managed server (if any) and wait for it; read the upstream's model ids when no
    names were given (waiting until it answers). The client is made later, in `start`."""
    from llmrelay.worker.engines.openai.engine import OpenAIEngine
    from llmrelay.worker.engines.openai.startup import start_managed, wait_for_models

    server = start_managed(options.managed, options.api_key) if options.managed else None
    try:
        models = [] if options.names else wait_for_models(options)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return OpenAIEngine(options, server, models)
