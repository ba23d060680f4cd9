"""The llama.cpp engine: GGUF files through llama-cpp-python (the bundled default).

`options.py` reads the worker's flags (refusing those llama.cpp cannot honour, warning about
those it ignores) and imports no model library; `engine.py` is the engine, with its
continuous-batching scheduler, imported only when a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrelay.worker.engines.llamacpp.options import KV_CACHE_LAYOUTS, Options

if TYPE_CHECKING:
    from llmrelay.worker.engines.llamacpp.engine import LlamaCppEngine

__all__ = ["KV_CACHE_LAYOUTS", "Options", "load"]


def load(options: Options) -> LlamaCppEngine:
    from llmrelay.worker.engines.llamacpp.engine import LlamaCppEngine

    return LlamaCppEngine(options)
