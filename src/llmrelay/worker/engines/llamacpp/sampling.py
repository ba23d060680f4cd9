"""A sequence's llama.cpp samplers: its chain (logit bias, penalties, top-k, top-p,
temperature, the seeded draw or greedy), and, for a constrained request, its llguidance `Guide`
(engines/guidance.py, shared with the transformers engine).

An unconstrained token is drawn with `llama_sampler_sample` (the chain, in C); so is a token of a
lazy constraint before its opening marker (free text, the same draw as without tools). A
constrained one is drawn by letting the chain pick a token and asking the matcher about that one
token (a few microseconds); only if it is refused does the matcher compute its mask over the
whole vocabulary, the refused tokens' logits become -inf and the chain runs again on the rest.
Most steps of a schema-following answer are the first kind: the model already writes what the
schema wants. A mask that leaves no token the chain can pick (a dead end, or every allowed token
banned by a -inf logit_bias) raises DeadEnd, which ends that request with an error and nothing
else.
"""

from __future__ import annotations

import ctypes
import random
import warnings
from typing import Any

import llama_cpp
import numpy as np

from llmrelay.worker.engines.base import GenerationRequest
from llmrelay.worker.engines.guidance import DeadEnd, Grammars, Guide

__all__ = ["Candidates", "DeadEnd", "chain", "force", "grammars", "sample_constrained"]

PENALTY_LAST_N = 64  # llama.cpp's default window for repetition/frequency/presence penalties
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def chain(req: GenerationRequest, n_vocab: int, seed: int | None, history: list[int]) -> Any:
    """The sampler chain of one request; `history`: the prompt's end, which penalties see."""
    if seed is None:
        seed = random.getrandbits(32)
    smpl = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if req.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(req.logit_bias))(
            *(llama_cpp.llama_logit_bias(token=t, bias=b) for t, b in req.logit_bias.items()))
        add(smpl, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(req.logit_bias), biases))
    if req.repetition_penalty != 1.0 or req.frequency_penalty != 0.0 or req.presence_penalty != 0.0:
        add(smpl, llama_cpp.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, req.repetition_penalty, req.frequency_penalty,
            req.presence_penalty))
    if req.temperature < 1e-5:
        add(smpl, llama_cpp.llama_sampler_init_greedy())
    else:
        if req.top_k > 0:
            add(smpl, llama_cpp.llama_sampler_init_top_k(req.top_k))
        if req.top_p < 1.0:
            add(smpl, llama_cpp.llama_sampler_init_top_p(req.top_p, 1))
        add(smpl, llama_cpp.llama_sampler_init_temp(req.temperature))
        add(smpl, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    for t in history[-PENALTY_LAST_N:]:
        llama_cpp.llama_sampler_accept(smpl, t)
    return smpl


def grammars(vocab: Any, n_vocab: int) -> Grammars:
    """The model's constraints: its llguidance tokenizer from llguidance's own llama.cpp bridge
    (which reads every token's bytes, made on the first constrained request), every
    end-of-generation token of the vocabulary its end tokens."""
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]

    def tokenizer() -> Any:
        import llguidance.llamacpp

        with warnings.catch_warnings():  # a deprecated llama_cpp call per token
            warnings.simplefilter("ignore", DeprecationWarning)
            return llguidance.llamacpp.lltokenizer_from_vocab(vocab, n_vocab=n_vocab,
                                                              eos_token=eog or None)

    return Grammars(tokenizer, eog)


class Candidates:
    """One reusable array of every token's logit, in llama.cpp's layout (scheduler thread)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.pointer = self.data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self.array = llama_cpp.llama_token_data_array(data=self.pointer, size=n_vocab,
                                                      selected=-1, sorted=False)
        self.one = np.zeros(1, dtype=_TOKEN_DATA)
        self.one_array = llama_cpp.llama_token_data_array(
            data=self.one.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=1, selected=-1, sorted=False)

    def fill(self, ctx: Any, idx: int) -> Any:
        """Every token with its logit; returns the array to hand to samplers."""
        ptr = llama_cpp.llama_get_logits_ith(ctx, idx)
        self.data["id"] = self.ids
        self.data["logit"] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        self.data["p"] = 0.0
        return self._array(self.n_vocab)

    def keep(self, allowed: np.ndarray) -> None:
        """After `fill`: the tokens not `allowed` get a -inf logit."""
        np.copyto(self.data["logit"], -np.inf, where=~allowed)

    def _array(self, size: int) -> Any:
        a = self.array
        a.data, a.size, a.selected, a.sorted = self.pointer, size, -1, False
        return ctypes.byref(a)

    def any_allowed(self) -> bool:
        return bool(np.isfinite(self.data["logit"][: self.array.size]).any())

    def selected_is_possible(self) -> bool:
        """Whether the chain's pick has a finite logit (it picks something even when every
        candidate is ruled out)."""
        a = self.array
        return a.selected >= 0 and bool(np.isfinite(a.data[a.selected].logit))

    def selected(self) -> int:
        return int(self.array.data[self.array.selected].id)


def force(cands: Candidates, smpl: Any, guide: Guide | None, token: int) -> None:
    """`token` as a sequence's next, resuming another worker's generation: the samplers see it
    as if they had drawn it (penalties and the matcher accept it; a seeded draw advances its
    generator by the one draw it made there)."""
    cands.one[0] = (token, 0.0, 0.0)
    a = cands.one_array
    a.size, a.selected, a.sorted = 1, -1, False
    llama_cpp.llama_sampler_apply(smpl, ctypes.byref(a))
    if guide is not None:
        guide.feed([token])
    llama_cpp.llama_sampler_accept(smpl, token)


def sample_constrained(cands: Candidates, ctx: Any, idx: int, smpl: Any, guide: Guide) -> int:
    """One token of a constrained sequence (see the module docstring); the chain and the guide
    accept it. The token is always one the guide allows and the chain did not rule out (a -inf
    bias); when there is none, DeadEnd."""
    if not guide.active:  # a lazy constraint before its marker: free text
        token = int(llama_cpp.llama_sampler_sample(smpl, ctx, idx))
        guide.feed([token])
        return token
    llama_cpp.llama_sampler_apply(smpl, cands.fill(ctx, idx))
    token = cands.selected()
    if not (cands.selected_is_possible() and guide.allows(token)):
        array = cands.fill(ctx, idx)
        cands.keep(guide.allowed(cands.n_vocab))
        if not cands.any_allowed():
            raise DeadEnd()
        llama_cpp.llama_sampler_apply(smpl, array)
        token = cands.selected()
        if not cands.selected_is_possible():
            raise DeadEnd()
    guide.feed([token])
    llama_cpp.llama_sampler_accept(smpl, token)
    return token
