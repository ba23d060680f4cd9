"""The cost of sampling a constrained token on the llama.cpp engine, in process: one SmolLM2
context, the engine's own sampling functions, 8 prompts asking for a person as JSON, each
answered free and with bench_constrained's `PERSON` schema (temperature 0.7, a seed per prompt,
up to 80 tokens). Prints milliseconds per sampled token, free and constrained (the model's
decode steps are not counted). Insensitive to what else runs on a shared machine in a way that
bench_constrained's throughput is not.

It also runs against a tree from before the llguidance switch (8e4788f), whose sampler took a
GBNF grammar sampler:

    .venv/bin/python benchmarks/bench_constrained_sampling.py
    PYTHONPATH=/tmp/before-guidance/src .venv/bin/python benchmarks/bench_constrained_sampling.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import llama_cpp
from bench_constrained import PERSON, TOPICS

from llmrelay.worker.constraints import Constraint
from llmrelay.worker.engines.base import GenerationRequest
from llmrelay.worker.engines.llamacpp import sampling
from llmrelay.worker.models import resolve

MAX_TOKENS = 80


def main() -> None:
    llm = llama_cpp.Llama(str(resolve("smollm2").path), n_ctx=1024, n_threads=2, verbose=False)
    ctx, vocab = llm._ctx.ctx, llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    c = Constraint(schema=PERSON)
    make: Callable[[], Any]
    draw: Callable[[Any, Any, Any], int]
    try:  # the tree before the switch
        from llmrelay.worker.engines.llamacpp.grammar import compile_constraint  # type: ignore

        spec = compile_constraint(c)
        make = lambda: sampling.grammar_sampler(vocab, spec)  # type: ignore[attr-defined]  # noqa: E731
        draw = lambda cands, smpl, g: sampling.sample_constrained(cands, ctx, -1, smpl, g, None)  # noqa: E731
        version = "GBNF (llama.cpp grammar sampler)"
    except ImportError:
        grammars = sampling.grammars(vocab, n_vocab)
        make = lambda: grammars.guide(c)  # noqa: E731
        draw = lambda cands, smpl, g: sampling.sample_constrained(cands, ctx, -1, smpl, g)  # noqa: E731
        version = "llguidance"
    cands = sampling.Candidates(n_vocab)
    spent = {False: 0.0, True: 0.0}
    counts = {False: 0, True: 0}
    for i, topic in enumerate(TOPICS[:8]):
        prompt = llm.tokenize(f"<|im_start|>user\nDescribe {topic} as JSON with name, age, city and "
                              "hobbies.<|im_end|>\n<|im_start|>assistant\n".encode(), add_bos=False,
                              special=True)
        for constrained in (False, True):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            ids = (llama_cpp.llama_token * len(prompt))(*prompt)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, len(prompt))) == 0
            req = GenerationRequest(prompt="x", temperature=0.7, seed=i, max_new_tokens=MAX_TOKENS)
            smpl = sampling.chain(req, n_vocab, i, prompt)
            g = make() if constrained else None
            for _ in range(MAX_TOKENS):
                t0 = time.perf_counter()
                token = (draw(cands, smpl, g) if constrained
                         else llama_cpp.llama_sampler_sample(smpl, ctx, -1))
                spent[constrained] += time.perf_counter() - t0
                counts[constrained] += 1
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                one = (llama_cpp.llama_token * 1)(token)
                assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
            llama_cpp.llama_sampler_free(smpl)
            if g is not None and version.startswith("GBNF"):
                llama_cpp.llama_sampler_free(g)
    llm.close()
    print(f"{version}: free {1000 * spent[False] / counts[False]:.3f} ms/token ({counts[False]} "
          f"tokens), constrained {1000 * spent[True] / counts[True]:.3f} ms/token "
          f"({counts[True]} tokens)")


if __name__ == "__main__":
    main()
