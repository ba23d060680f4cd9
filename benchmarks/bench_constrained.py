"""Constrained decoding inside the batch: 8 clients with a JSON schema against 8 without, in one run.

Starts a controller, one SmolLM2 worker (llama.cpp engine, 8 sequences batched) and the API
server on free loopback ports. Each round, `--clients` concurrent clients send `--requests`
chat requests each, one after another, asking for a person as JSON: once free (no
`response_format`), once constrained by a `json_schema` (the same schema every time), rounds
alternating so both see the same machine. Prints completion tokens/s per kind (median over the
rounds), the ratio constrained / free, the share of constrained answers valid against the
schema, and how many grammars the worker compiled (the schema must be compiled once, not per
request).

    .venv/bin/python benchmarks/bench_constrained.py [--clients 8] [--requests 3]
        [--rounds 3] [--max-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
import jsonschema
from _stack import Stack, load_average

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer"},
    "city": {"type": "string", "maxLength": 40},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
TOPICS = ["a baker", "a pilot", "a painter", "a farmer", "a nurse", "a poet", "a sailor",
          "a chess player", "a teacher", "a miner", "a dancer", "a judge"]


def body(i: int, constrained: bool, max_tokens: int) -> dict[str, object]:
    out: dict[str, object] = {
        "model": "smol", "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
        "messages": [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON "
                      "with name, age, city and hobbies."}]}
    if constrained:
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "person", "schema": PERSON}}
    return out


def run(api: str, clients: int, requests: int, constrained: bool, max_tokens: int
        ) -> tuple[float, int, int, int]:
    """(completion tokens/s, answers valid against the schema, answers, completion tokens)."""
    tokens = valid = answers = 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal tokens, valid, answers
        with httpx.Client(base_url=api, timeout=600) as h:
            for r in range(requests):
                res = h.post("/v1/chat/completions",
                             json=body(c * requests + r, constrained, max_tokens))
                res.raise_for_status()
                data = res.json()
                ok = 0
                try:
                    jsonschema.validate(json.loads(data["choices"][0]["message"]["content"]),
                                        PERSON)
                    ok = 1
                except (ValueError, jsonschema.ValidationError):
                    pass
                with lock:
                    tokens += data["usage"]["completion_tokens"]
                    valid += ok
                    answers += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens / (time.perf_counter() - t0), valid, answers, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="per client, one after another")
    ap.add_argument("--rounds", type=int, default=3, help="each kind, alternating")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--n-threads", type=int, default=2)
    args = ap.parse_args()

    stack = Stack()
    try:
        stack.start_controller()
        worker = stack.start_worker(extra=("--limit-worker-concurrency", str(args.clients),
                                           "--n-threads", str(args.n_threads),
                                           "--context-length", "2048"))
        stack.start_api()
        stack.wait_models(1)
        run(stack.api, 2, 1, True, 16)  # warm up both paths (and compile the schema once)
        run(stack.api, 2, 1, False, 16)
        rates: dict[bool, list[float]] = {False: [], True: []}
        lengths: dict[bool, list[float]] = {False: [], True: []}
        valid = answers = 0
        for _ in range(args.rounds):
            for constrained in (False, True):
                rate, v, n, t = run(stack.api, args.clients, args.requests, constrained,
                                    args.max_tokens)
                rates[constrained].append(rate)
                lengths[constrained].append(t / n)
                if constrained:
                    valid, answers = valid + v, answers + n
        status = httpx.post(worker + "/worker_get_status").json()["llmrelay"]
    finally:
        stack.stop()

    free, bound = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"\n{args.clients} clients x {args.requests} requests, {args.rounds} rounds each, "
          f"max_tokens {args.max_tokens}; {load_average()}")
    # Tokens per answer: shorter answers carry more of the fixed cost per request (the
    # prompt, the HTTP round trip), so they lower tokens/s whether constrained or not.
    print(f"{'':24} {'tokens/s (median)':>18} {'rounds':>24} {'tokens per answer':>18}")
    for name, kind in (("free", False), ("json_schema", True)):
        print(f"{name:24} {statistics.median(rates[kind]):18.1f} "
              f"{' '.join(f'{r:.1f}' for r in rates[kind]):>24} "
              f"{statistics.mean(lengths[kind]):18.1f}")
    print(f"constrained / free: {bound / free:.2f}x; constrained answers valid: {valid}/{answers}; "
          f"grammars compiled by the worker: {status.get('grammars_compiled')} "
          f"(for {answers + 2} constrained requests)")


if __name__ == "__main__":
    main()
