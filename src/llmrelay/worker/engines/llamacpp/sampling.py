"""A sequence's llama.cpp samplers: its chain (logit bias, penalties, top-k, top-p,
temperature, the seeded draw or greedy), and, for a constrained request, its grammar.

An unconstrained token is drawn with `llama_sampler_sample` (the chain, in C). A constrained one
is drawn as llama.cpp's own server does it, never letting the grammar meet a token it rejects
(llama.cpp aborts the process then): the chain picks a token, the grammar checks that one
token; only if it is refused is the grammar applied to the candidates and the chain run again
on what is left. The grammar goes through the 128 likeliest tokens first (after the request's
logit bias), then the 2048 likeliest, and through the whole vocabulary only if none of those is
allowed: a whole pass costs over ten milliseconds on a 49k vocabulary, the short ones well under
one each. A
grammar that leaves no candidate at all (a dead end) raises DeadEnd, which ends that request
with an error and nothing else.
"""

from __future__ import annotations

import ctypes
import random
from typing import Any

import llama_cpp
import numpy as np

from llmrelay.worker.engines.base import EngineError, GenerationRequest
from llmrelay.worker.engines.llamacpp.grammar import Grammar

PENALTY_LAST_N = 64  # llama.cpp's default window for repetition/frequency/presence penalties
TOP_FIRST = (128, 2048)  # candidates the grammar checks before the whole vocabulary
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class DeadEnd(EngineError):
    """The grammar allows no token: the constrained text cannot go on."""


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


def grammar_sampler(vocab: Any, grammar: Grammar) -> Any:
    """A fresh grammar sampler (its own state) for one sequence."""
    text = grammar.gbnf.encode()
    if grammar.trigger is None:
        smpl = llama_cpp.llama_sampler_init_grammar(vocab, text, b"root")
    else:
        patterns = (ctypes.c_char_p * 1)(grammar.trigger.encode())
        smpl = llama_cpp.llama_sampler_init_grammar_lazy_patterns(vocab, text, b"root", patterns,
                                                                   1, None, 0)
    if not smpl:  # never add a NULL sampler to anything: llama.cpp would dereference it
        raise EngineError("llama.cpp refused the grammar made from the schema")
    return smpl


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

    def fill_top(self, ctx: Any, idx: int, k: int, bias: dict[int, float] | None) -> Any:
        """The `k` likeliest tokens (after `bias`) with their logits."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx),
                                       shape=(self.n_vocab,))
        if bias:
            logits = logits.copy()
            for t, b in bias.items():
                if 0 <= t < self.n_vocab:
                    logits[t] += b
        top = np.argpartition(-logits, k)[:k]
        raw = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        self.data["id"][:k] = top
        self.data["logit"][:k] = raw[top]  # the chain adds the bias itself
        self.data["p"][:k] = 0.0
        return self._array(k)

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

    def allows(self, grammar: Any, token: int) -> bool:
        self.one[0] = (token, 1.0, 0.0)
        self.one_array.size, self.one_array.selected, self.one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self.one_array))
        return bool(np.isfinite(self.one["logit"][0]))


def force(cands: Candidates, smpl: Any, grammar: Any, token: int) -> None:
    """`token` as a sequence's next, resuming another worker's generation: the samplers see it
    as if they had drawn it (penalties and the grammar accept it; a seeded draw advances its
    generator by the one draw it made there)."""
    cands.one[0] = (token, 0.0, 0.0)
    a = cands.one_array
    a.size, a.selected, a.sorted = 1, -1, False
    llama_cpp.llama_sampler_apply(smpl, ctypes.byref(a))
    if grammar is not None:
        llama_cpp.llama_sampler_accept(grammar, token)
    llama_cpp.llama_sampler_accept(smpl, token)


def sample_constrained(cands: Candidates, ctx: Any, idx: int, smpl: Any, grammar: Any,
                       bias: dict[int, float] | None = None) -> int:
    """One token of a constrained sequence (see the module docstring); both samplers accept it.
    The token accepted is always one the grammar allows and the chain did not rule out (a
    -inf bias); when there is none, DeadEnd."""
    llama_cpp.llama_sampler_apply(smpl, cands.fill(ctx, idx))
    token = cands.selected()
    if not cands.allows(grammar, token):
        # filled one at a time: every tier is the same array, refilled
        tiers = [k for k in TOP_FIRST if k < cands.n_vocab]
        arrays = (cands.fill_top(ctx, idx, k, bias) if k else cands.fill(ctx, idx)
                  for k in (*tiers, 0))
        for array in arrays:
            llama_cpp.llama_sampler_apply(grammar, array)
            if not cands.any_allowed():
                continue
            llama_cpp.llama_sampler_apply(smpl, array)
            token = cands.selected()
            if cands.selected_is_possible() and cands.allows(grammar, token):
                break
        else:
            raise DeadEnd("the output constraint allows no next token (the grammar made from "
                          "the schema, with the request's logit_bias, dead-ends here); the "
                          "answer was ended")
    llama_cpp.llama_sampler_accept(grammar, token)
    llama_cpp.llama_sampler_accept(smpl, token)
    return token
