"""The engines, by name: the one table the worker builds its engine from.

Each entry is a module (a package for the real engines) with an `Options` dataclass,
`Options.from_args(args, model)` reading the worker's flags (refusing those the engine cannot
honour), and `load(options) -> Engine`. Reading the options imports no model library; `load`
does. `auto` picks llama.cpp for a GGUF file and transformers for an HF folder.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from llmrelay.worker.engines.base import Engine, EngineError
from llmrelay.worker.models import ResolvedModel

ENGINES: dict[str, str] = {
    "llamacpp": "llmrelay.worker.engines.llamacpp",
    "transformers": "llmrelay.worker.engines.hf",
    "openai": "llmrelay.worker.engines.openai",
    "synthetic": "llmrelay.worker.engines.synthetic",  # no model: benchmarks and fault tests
}
NEEDS_MODEL = {"llamacpp", "transformers"}  # the others take no --model-path of their own
INSTALL = {
    "transformers": "the transformers engine needs torch and transformers: install them with "
                    "`pip install torch` then `pip install 'llmrelay[transformers]'`",
}


def choose(name: str, model: ResolvedModel | None) -> str:
    """The engine for `--engine NAME` (`auto`: by the kind of model)."""
    if name == "auto":
        return "llamacpp" if model is None or model.kind == "gguf" else "transformers"
    if name not in ENGINES:
        raise EngineError(f"the {name} engine is not available in this version of llmrelay "
                          f"(engines: {', '.join(ENGINES)})")
    return name


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(ENGINES[name])
    except ImportError as e:
        hint = INSTALL.get(name, f"the {name} engine could not be imported")
        raise EngineError(f"{hint} ({e})") from e


def build(name: str, args: argparse.Namespace, model: ResolvedModel | None) -> Engine:
    """Read the engine's options from the flags, then load it."""
    mod = module(name)
    try:
        engine: Engine = mod.load(mod.Options.from_args(args, model))
    except ImportError as e:  # a library the engine needs only when it loads
        raise EngineError(f"{INSTALL.get(name, f'the {name} engine cannot load')} ({e})") from e
    return engine
