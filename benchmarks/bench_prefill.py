"""Long prompts arriving on a busy llama.cpp worker: running streams' inter-token latency, and
the long prompts' time to first token.

Starts one SmolLM2 worker (`--no-register`: no controller needed) from this checkout and, with
`--before SRC`, a second one running the code in the source folder SRC (another checkout's
`src`, e.g. a `git worktree` of the commit before a change), on free loopback ports. The workers
take turns, round by round (the order swapped every other round), so both see the same load of
this shared machine; only one is busy at a time. Each round, on each worker:

1. alone: one long prompt (`--long-tokens`, default 2,000 tokens) on the idle worker, its time
   to first token (TTFT);
2. streams: 4 greedy streams (`--streams`) counting on and on, restarted when one ends; the gaps
   between their frames for `--window` seconds are the inter-token latencies (ITL) without long
   prompts;
3. with long prompts: while the streams go on, `--long` long prompts one after another (each a
   new text: nothing of it is cached), their TTFT, and the streams' gaps that overlap a long
   prompt's wait for its first token are the ITL while long prompts arrive.

Prints medians and p95 over all rounds, side by side, and the ratios the issue asks about:
ITL p95 with long prompts / without (target <= 2), and, with `--before`, the long prompts' TTFT
(while streams run) after / before (target <= 1.3).

    .venv/bin/python benchmarks/bench_prefill.py [--before /tmp/before-prefill/src]
        [--rounds 3] [--long 2] [--long-tokens 2000] [--streams 4] [--window 4]
        [--n-threads 2] [--worker-args "--log-level debug"]

The frames are the worker's own (`/worker_generate_stream`, no API server): one frame per batch
step per stream unless a reader falls behind (then its tokens come merged in one frame).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
from _stack import spawn, stop_children, wait_for

from llmrelay.worker.managed import free_port

COUNT = "1, 2, 3, 4, 5, 6, 7, 8,"  # a greedy model counts on for hundreds of tokens
WORDS = ("river stone lantern harbour meadow engine violin orchard compass glacier theory "
         "market ladder thunder pencil garden island copper whisper canyon").split()


def start_worker(src: Path | None, n_threads: int, context: int, extra: list[str],
                 logs: Path, name: str) -> str:
    port = free_port()
    env = {"PYTHONPATH": str(src)} if src else None
    spawn([sys.executable, "-m", "llmrelay.cli", "worker", "--port", str(port), "--no-register",
           "--model-path", "smollm2", "--model-names", "smol", "--n-threads", str(n_threads),
           "--limit-worker-concurrency", "8", "--context-length", str(context), *extra],
          logs / f"worker-{name}.log", env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.post(url + "/worker_get_status").status_code == 200, 120,
             f"worker {name}")
    return url


def long_prompt(worker: str, n: int, tokens: int) -> list[int]:
    """`tokens` token ids of a text seen nowhere before (its first words are its number)."""
    words = [WORDS[(n * 7 + i * i) % len(WORDS)] for i in range(tokens)]
    text = f"Report number {n}. " + " ".join(words)
    ids: list[int] = httpx.post(worker + "/tokenize", json={"prompt": text},
                                timeout=60).json()["tokens"]
    assert len(ids) >= tokens, len(ids)
    return ids[:tokens]


def frames(worker: str, body: dict[str, object], stop: threading.Event | None = None,
           times: list[float] | None = None) -> list[float]:
    """Stream one generation; the times at which frames with new tokens arrived (appended to
    `times` as they come, when given)."""
    times = [] if times is None else times
    seen = 0
    with httpx.stream("POST", worker + "/worker_generate_stream",
                      json={**body, "echo": False}, timeout=600) as r:
        buf = b""
        for raw in r.iter_raw():
            now = time.perf_counter()
            buf += raw
            *done, buf = buf.split(b"\0")
            for part in done:
                if part:
                    frame = json.loads(part)
                    if frame.get("error_code", 0) != 0:
                        raise RuntimeError(f"the worker failed: {frame}")
                    n = frame["usage"]["completion_tokens"]
                    if n > seen:
                        seen = n
                        times.append(now)
            if stop is not None and stop.is_set():
                break
    return times


def ttft(worker: str, ids: list[int]) -> float:
    t0 = time.perf_counter()
    times = frames(worker, {"prompt_token_ids": ids, "max_new_tokens": 2, "temperature": 0})
    return times[0] - t0


class Streams:
    """`n` greedy streams kept running until `stop()`; every frame time of each stream."""

    def __init__(self, worker: str, n: int) -> None:
        self.worker = worker
        self.done = threading.Event()
        self.times: list[list[float]] = [[] for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        while not self.done.is_set():  # a stream that ended starts again (a new gap list)
            self.times[i].append(float("nan"))  # no gap across two generations
            frames(self.worker, {"prompt": COUNT, "max_new_tokens": 1000, "temperature": 0},
                   self.done, self.times[i])

    def started(self) -> bool:
        return all(len([t for t in ts if t == t]) >= 2 for ts in self.times)

    def gaps(self, since: float, until: float) -> list[float]:
        """Gaps between frames of one generation that overlap [since, until]."""
        out = []
        for ts in self.times:
            for a, b in zip(ts, ts[1:], strict=False):
                if a == a and b == b and b > since and a < until:
                    out.append(b - a)
        return out

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(600)


def one_round(worker: str, args: argparse.Namespace, serial: int, out: dict[str, list[float]],
              ) -> int:
    """Measure one round on `worker`; returns the next unused prompt number."""
    out["alone"].append(ttft(worker, long_prompt(worker, serial, args.long_tokens)))
    serial += 1
    prompts = [long_prompt(worker, serial + k, args.long_tokens) for k in range(args.long)]
    serial += args.long
    streams = Streams(worker, args.streams)
    waits = []
    try:
        wait_for(streams.started, 120, "the streams' first tokens")
        t0 = time.perf_counter()
        time.sleep(args.window)
        alone = (t0, time.perf_counter())
        for ids in prompts:
            sent = time.perf_counter()
            out["ttft_busy"].append(ttft(worker, ids))
            waits.append((sent, sent + out["ttft_busy"][-1]))
            time.sleep(0.5)  # the streams alone for a moment between two long prompts
    finally:
        streams.stop()
    out["itl_plain"].extend(streams.gaps(*alone))
    for since, until in waits:
        out["itl_long"].extend(streams.gaps(since, until))
    return serial


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, default=None,
                    help="a source folder (another checkout's src) to run a second worker from")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long", type=int, default=2, help="long prompts per round")
    ap.add_argument("--long-tokens", type=int, default=2000)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--window", type=float, default=4.0,
                    help="seconds of the streams alone measured per round")
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--worker-args", default="", help="extra worker flags, one string")
    args = ap.parse_args()
    import tempfile

    logs = Path(tempfile.mkdtemp(prefix="llmrelay-bench-"))
    context = args.long_tokens + 512  # SmolLM2-135M was trained on 8,192 tokens
    extra = shlex.split(args.worker_args)
    sides = {"this checkout": start_worker(None, args.n_threads, context, extra, logs, "after")}
    if args.before:
        sides["--before"] = start_worker(args.before.resolve(), args.n_threads, context, extra,
                                         logs, "before")
    from _stack import load_average

    print(f"before: {load_average()}; logs in {logs}")
    results = {name: {k: [] for k in ("alone", "itl_plain", "itl_long", "ttft_busy")}
               for name in sides}
    serial = 0
    try:
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                serial = one_round(sides[name], args, serial, results[name])
                print(f"round {r + 1}, {name}: done", file=sys.stderr)
    finally:
        stop_children()
    print(f"\n{args.rounds} rounds, {args.streams} streams (greedy, one worker frame per step), "
          f"{args.long} long prompts of {args.long_tokens} tokens per round, SmolLM2 worker "
          f"(--n-threads {args.n_threads}, --limit-worker-concurrency 8, --context-length "
          f"{context}); times in ms\n")
    print("| worker | ITL p50 / p95, streams alone | ITL p50 / p95, long prompts arriving | "
          "ITL p95 ratio | long prompt TTFT p50 / max, streams running | "
          "long prompt TTFT p50, idle worker | gaps measured (alone / arriving) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, res in results.items():
        plain = [x * 1000 for x in res["itl_plain"]]
        busy = [x * 1000 for x in res["itl_long"]]
        tb = [x * 1000 for x in res["ttft_busy"]]
        alone = [x * 1000 for x in res["alone"]]
        print(f"| {name} | {statistics.median(plain):.0f} / {pct(plain, 95):.0f} | "
              f"{statistics.median(busy):.0f} / {pct(busy, 95):.0f} | "
              f"{pct(busy, 95) / pct(plain, 95):.2f} | "
              f"{statistics.median(tb):.0f} / {max(tb):.0f} | {statistics.median(alone):.0f} | "
              f"{len(plain)} / {len(busy)} |")
    if args.before:
        a, b = results["this checkout"], results["--before"]
        print(f"\nlong prompt TTFT with streams running, this checkout / --before (p50): "
              f"{statistics.median(a['ttft_busy']) / statistics.median(b['ttft_busy']):.2f}; "
              f"on the idle worker: {statistics.median(a['alone']) / statistics.median(b['alone']):.2f}")
    print(f"\nafter: {load_average()}")


if __name__ == "__main__":
    main()
