"""Why the llama.cpp engine writes each step's batch in sequence-id order: a raw decode loop.

llama.cpp splits a batch over a KV cache with a stream per sequence (`kv_unified` off, the
engine's default `--kv-cache per-sequence`) into sub-batches of sequences whose ids follow each
other in the order the batch lists them, one pass each; a unified pool has no such limit. This
script decodes 8 sequences of SmolLM2 together through llama-cpp-python's low-level API (no
server, no engine), listing them in several orders, with both KV layouts, and prints the
tokens/s of each (median of `--repeat` runs):

    .venv/bin/python benchmarks/bench_batch_order.py [--steps 48] [--repeat 3] [--n-threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp as lc

from llmrelay.worker.models import resolve

PROMPT_TOKENS = 40
ORDERS = {
    "ids 0, 1, ..., 7": list(range(8)),
    "ids 3, 0, 1, 2, 4, ..., 7": [3, 0, 1, 2, 4, 5, 6, 7],
    "ids 7, 6, ..., 0": list(range(7, -1, -1)),
    "ids 0, 2, ..., 14 (gaps, in order)": list(range(0, 16, 2)),
    "one sequence": [3],
}


def decode(model: object, seqs: list[int], unified: bool, steps: int, threads: int) -> float:
    """Tokens/s of `steps` decode steps of every sequence in `seqs`, listed in that order."""
    p = lc.llama_context_default_params()
    p.n_ctx, p.n_seq_max = 512 * 16, 16
    p.n_batch = p.n_ubatch = 512
    p.n_threads = p.n_threads_batch = threads
    p.kv_unified = unified
    p.no_perf = True
    ctx = lc.llama_init_from_model(model, p)
    batch = lc.llama_batch_init(512, 0, 1)
    try:
        def add(token: int, pos: int, seq: int, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
            batch.n_tokens += 1

        for s in seqs:  # each prompt alone first
            batch.n_tokens = 0
            for j in range(PROMPT_TOKENS):
                add(100 + j + s, j, s, j == PROMPT_TOKENS - 1)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a prompt")
        t0 = time.perf_counter()
        for step in range(steps):
            batch.n_tokens = 0
            for s in seqs:
                add(200 + step, PROMPT_TOKENS + step, s, True)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a step")
        return len(seqs) * steps / (time.perf_counter() - t0)
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-threads", type=int, default=2)
    args = ap.parse_args()
    quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept alive until the end
    lc.llama_log_set(quiet, None)
    lc.llama_backend_init()
    path = str(resolve("smollm2").path)
    model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
    results: dict[tuple[str, bool], list[float]] = {}
    try:
        for _ in range(args.repeat):  # orders and layouts alternate within each repeat
            for name, seqs in ORDERS.items():
                for unified in (False, True):
                    results.setdefault((name, unified), []).append(
                        decode(model, seqs, unified, args.steps, args.n_threads))
    finally:
        lc.llama_model_free(model)
    print(f"\nSmolLM2 Q4_1, {PROMPT_TOKENS}-token prompts, {args.steps} decode steps, "
          f"{args.n_threads} threads, median of {args.repeat}\n")
    print("| order of the sequences in each batch | per-sequence streams tok/s | unified pool tok/s |")
    print("|---|---:|---:|")
    for name in ORDERS:
        per, uni = (statistics.median(results[(name, u)]) for u in (False, True))
        print(f"| {name} | {per:.0f} | {uni:.0f} |")


if __name__ == "__main__":
    main()
