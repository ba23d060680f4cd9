"""The transformers engine: Hugging Face models through torch + transformers (HF folders, GGUF
files dequantized by transformers, and sentence-embedding models).

`options.py` reads the worker's flags and decides what can be decided before loading (device,
memory, the kind of model); `engine.py` is the causal-LM engine with its scheduler, `embeddings.py`
the embedding engine, `sampling.py` the per-request logits processors, `constraints.py` output
constraints (llguidance) and logit bias, and `compat.py` the one module that touches
transformers' internals (checked against its version at load). Importing
this package imports neither torch nor transformers: `load` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrelay.worker.engines.hf.options import Options, is_embedding_model

if TYPE_CHECKING:
    from llmrelay.worker.engines.hf.embeddings import EmbeddingEngine
    from llmrelay.worker.engines.hf.engine import TransformersEngine

__all__ = ["Options", "load"]


def load(options: Options) -> TransformersEngine | EmbeddingEngine:
    """Load the model of `options` (its device resolved by `Options.from_args`, else the best
    present): an embedding engine for an embedding model, else the causal-LM engine."""
    import torch

    from llmrelay.worker.engines.hf.options import check_flags

    if options.n_threads:
        torch.set_num_threads(options.n_threads)
    device = options.device if options.device is not None else check_flags(options)
    if is_embedding_model(options.path):
        from llmrelay.worker.engines.hf.embeddings import EmbeddingEngine

        return EmbeddingEngine(options, device)
    from llmrelay.worker.engines.hf.engine import TransformersEngine

    return TransformersEngine(options, device)
