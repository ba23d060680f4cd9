"""Constraints (worker/constraints.py) and logit bias for the transformers engine, token by
token, per request: logits processors that run first in a request's own processors, alone in
`generate()` and inside the batch manager (compat.BatchProcessors).

Constraints compile through llguidance (engines/guidance.py, shared with the llama.cpp engine:
the same grammars and the same refusals); one `LLTokenizer` per model is made at load from the
HF tokenizer (`load_grammars`). Each request's processor feeds its `Guide` the tokens generated
since it last ran, read off the ids it is given (prompt + generated in both paths), and sets the
scores of the tokens it does not allow to -inf, with numpy (llguidance.torch's helper is
torch.compile'd: 31 s on its first CPU call). If no token at all is allowed, the processor
leaves only an end token possible (the sampler never sees a row of -inf) and records `error`,
which the engine then ends that request with.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from llmrelay.protocol import ErrorCode
from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.engines.guidance import DeadEnd, Grammars, Guide

log = logging.getLogger("llmrelay.worker")


def load_grammars(hf_tokenizer: Any, n_vocab: int, eos_ids: list[int]) -> Grammars | None:
    """The model's Grammars, or None (with a warning) when llguidance cannot serve it."""
    try:
        import llguidance.hf

        eos = sorted(eos_ids)
        tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=max(n_vocab, len(hf_tokenizer)), eos_token=eos or None)
        return Grammars(lambda: tokenizer, eos)
    except ImportError:
        log.warning("llguidance is not installed: tools and response_format are refused by "
                    "this worker (pip install llguidance)")
    except Exception as e:  # e.g. a slow (non-Rust) tokenizer
        log.warning("llguidance cannot use this model's tokenizer (%s: %s): tools and "
                    "response_format are refused by this worker", type(e).__name__, e)
    return None


class Constrained(LogitsProcessor):
    """One request's constraint, applied to its scores (one row) at every step."""

    def __init__(self, guide: Guide, n_prompt: int) -> None:
        self.guide = guide
        self.n_prompt = n_prompt
        self.seen = 0  # generated tokens handled so far
        self.error: EngineError | None = None  # set at a dead end

    @classmethod
    def of(cls, grammars: Grammars, c: Any, n_prompt: int) -> Constrained:
        """A request's processor for constraint `c` (compiled, cached; EngineError 40001 when
        it cannot be enforced)."""
        return cls(grammars.guide(c), n_prompt)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[0, self.n_prompt + self.seen:].tolist()
        self.seen += len(new)
        self.guide.feed(new)
        if not self.guide.active:
            return scores  # free text until the opening marker
        row = scores[0]
        _keep(row, self.guide.allowed(row.size(-1)))
        if not bool(torch.isfinite(row).any()):
            self.error = DeadEnd()
            eos = self.guide.grammars.eos
            row[eos[0] if eos else 0] = 0.0  # one possible token for the sampler; the engine fails it
        return scores


def _keep(row: torch.Tensor, allowed: np.ndarray) -> None:
    """Set the scores of the tokens not `allowed` to -inf, in place."""
    if row.device.type == "cpu" and row.is_contiguous() and row.dtype in (torch.float32,
                                                                          torch.float16):
        np.copyto(row.numpy(), -np.inf, where=~allowed)
    else:
        row.masked_fill_(torch.from_numpy(~allowed).to(row.device), float("-inf"))


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a value added to the scores of the given token ids."""

    def __init__(self, bias: dict[int, float], n_vocab: int) -> None:
        bad = [t for t in bias if not 0 <= t < n_vocab]
        if bad:
            raise EngineError(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                              f"(0..{n_vocab - 1})", ErrorCode.PARAM_OUT_OF_RANGE)
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.ids.device != scores.device:
            self.ids, self.values = self.ids.to(scores.device), self.values.to(scores.device)
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores
