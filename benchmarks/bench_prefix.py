"""Cache-aware `prefix` dispatch against `shortest_queue`: TTFT on a late turn of many chats.

For each method, starts a controller with that dispatch method, two SmolLM2 workers and the
API server on free loopback ports, then runs `--conversations` multi-turn conversations in
parallel (one thread each, streaming `openai`-SDK calls). Each conversation starts with a long
system prompt, so re-evaluating a conversation's history on a worker that does not hold it costs
time. Prints time to first token per turn (median, p95) and the ratio prefix / shortest_queue.

Between turns each conversation pauses for a random time up to `--think` seconds (the same
pauses for both methods), as users do; with `--think 0` all conversations move in lockstep,
which makes `shortest_queue` send each conversation to the same worker turn after turn.

Each worker keeps `--slots` sequences (its `--limit-worker-concurrency`: the KV cache holds that
many conversations). The default, half the conversations plus two, is the case cache-aware
dispatch is for: the two workers together can hold every conversation, one alone cannot. With
`--slots` at least the number of conversations each worker can hold them all, and any worker
holds an older turn of any conversation.

    .venv/bin/python benchmarks/bench_prefix.py [--conversations 20] [--turns 5] [--slots N]
        [--think 2] [--repeat 1] [--timeout 120] [--worker-args "--log-level debug"]

Bounded in time: every request has `--timeout` seconds; a conversation whose request fails or
times out stops there, and the table says how many turns were measured.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import threading
import time

import openai
from _stack import Stack, load_average

TIMEOUT = 120.0  # seconds per request (--timeout)
SHARED = False  # --shared-system
THINK = 2.0  # --think: seconds of pause between turns, at most (uniform)
SYSTEM = ("You are a helpful assistant for a travel agency. " * 12).strip()


def conversation(api: str, c: int, turns: int, ttft: dict[int, list[float]],
                 lock: threading.Lock, start: threading.Barrier, rep: int = 0) -> None:
    client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0,
                           timeout=TIMEOUT)
    # By default each conversation's own text comes first, so a worker that has not served it
    # holds no useful prefix; with --shared-system every conversation starts with the same long
    # system prompt, which every slot of every worker soon holds (only the rest differs).
    messages = [{"role": "system", "content": f"{SYSTEM} Customer number {c}." if SHARED else
                 f"Customer number {c}. {SYSTEM}"}]
    rng = random.Random(f"{rep}-{c}")  # the same pauses for both methods
    start.wait()
    for turn in range(1, turns + 1):
        if turn > 1 and THINK > 0:
            time.sleep(rng.uniform(0, THINK))  # the user reads and types: turns drift apart
        messages.append({"role": "user", "content": f"Suggest city number {turn} to visit."})
        t0 = time.perf_counter()
        first = None
        text = ""
        try:
            for chunk in client.chat.completions.create(
                    model="smol", messages=messages,  # type: ignore[arg-type]
                    max_tokens=24, temperature=0, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.perf_counter() - t0
                    text += chunk.choices[0].delta.content
        except openai.OpenAIError as e:
            print(f"conversation {c}, turn {turn}: {type(e).__name__}: {e}; stopping it")
            return
        with lock:
            ttft[turn].append(first if first is not None else time.perf_counter() - t0)
        messages.append({"role": "assistant", "content": text})


def run(method: str, conversations: int, turns: int, threads: int, slots: int,
        worker_args: tuple[str, ...] = (), rep: int = 0) -> dict[int, list[float]]:
    stack = Stack()
    try:
        stack.start_controller(("--dispatch-method", method))
        for _ in range(2):
            stack.start_worker(extra=("--limit-worker-concurrency", str(slots),
                                      "--context-length", "2048", "--n-threads", str(threads),
                                      *worker_args))
        api = stack.start_api()
        stack.wait_models(2)
        ttft: dict[int, list[float]] = {t: [] for t in range(1, turns + 1)}
        lock = threading.Lock()
        barrier = threading.Barrier(conversations)
        ts = [threading.Thread(target=conversation, args=(api, c, turns, ttft, lock, barrier,
                                                                  rep))
              for c in range(conversations)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return ttft
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--n-threads", type=int, default=1, help="llama.cpp threads per worker")
    ap.add_argument("--slots", type=int, default=0,
                    help="sequences per worker (default: conversations // 2 + 2)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="whole runs per method (different pauses each), samples pooled")
    ap.add_argument("--think", type=float, default=2.0,
                    help="pause between a conversation's turns: uniform in [0, THINK] seconds "
                    "(0: every conversation sends its next turn at once, in lockstep)")
    ap.add_argument("--worker-args", default="", help="extra worker flags, one string")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--shared-system", action="store_true",
                    help="the same system prompt first in every conversation (see conversation)")
    args = ap.parse_args()
    global TIMEOUT, SHARED, THINK
    TIMEOUT, SHARED, THINK = args.timeout, args.shared_system, args.think
    slots = args.slots or args.conversations // 2 + 2
    print(f"before: {load_average()}")
    results: dict[str, dict[int, list[float]]] = {
        m: {t: [] for t in range(1, args.turns + 1)} for m in ("shortest_queue", "prefix")}
    for rep in range(args.repeat):  # each repeat: both methods, same pauses, fresh stacks
        for m in (("shortest_queue", "prefix") if rep % 2 == 0 else ("prefix", "shortest_queue")):
            for turn, values in run(m, args.conversations, args.turns, args.n_threads, slots,
                                    tuple(shlex.split(args.worker_args)), rep).items():
                results[m][turn].extend(values)
    print(f"\n{args.conversations} parallel conversations x {args.repeat} runs, {args.turns} turns, "
          f"2 SmolLM2 workers "
          f"({args.n_threads} llama.cpp thread, {slots} slots each), "
          f"pauses of 0-{THINK:g} s between turns, "
          f"{'shared system prompt first' if SHARED else 'per-conversation text first'}, "
          f"time to first token in ms\n")
    print("| turn | measured (sq / prefix) | shortest_queue p50 | shortest_queue p95 | "
          "prefix p50 | prefix p95 | prefix / shortest_queue (p50) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for turn in range(1, args.turns + 1):
        sq = sorted(x * 1000 for x in results["shortest_queue"][turn])
        px = sorted(x * 1000 for x in results["prefix"][turn])
        if not sq or not px:
            print(f"| {turn} | {len(sq)} / {len(px)} | | | | | |")
            continue
        print(f"| {turn} | {len(sq)} / {len(px)} | {statistics.median(sq):.0f} | "
              f"{sq[int(0.95 * (len(sq) - 1))]:.0f} | {statistics.median(px):.0f} | "
              f"{px[int(0.95 * (len(px) - 1))]:.0f} | "
              f"{statistics.median(px) / statistics.median(sq):.2f} |")
    print(f"\nafter: {load_average()}")


if __name__ == "__main__":
    main()
