"""Fair sharing between API keys on one saturated worker, with and without it, in one run.

One controller, one API server with a keys file (keys A, B and k1..k4; no limits), and one
SmolLM2 worker per way of sharing, each `--limit-worker-concurrency 4` (only one of them busy at
a time, so they do not compete for the cores):
- `fair`: fair sharing (`--fair-sharing on`, the default, with its default `--fair-reserve 1`);
- `fair, no reserve`: fair sharing with `--fair-reserve 0` (a newcomer waits for a place);
- `first come`: `--fair-sharing off` (the queue in arrival order).

Two scenarios per worker, side by side:
1. Flood: key A keeps 32 long requests (`--long-tokens`) in flight; key B sends one short request
   (`--short-tokens`) at a time. B's time to first token under the flood against its value on
   the idle worker (target: p95 <= 2x). First come is slow by nature; its B requests stop after
   `--fifo-cap` seconds.
2. Mixed: four keys with the same demand (`--clients` streams each, back to back) but requests
   of different sizes (16, 32, 64, 128 tokens) for `--seconds`; tokens served per key inside
   the window (streamed tokens counted as they arrive), and Jain's fairness index over the
   keys (target: >= 0.95): of completion tokens, and of the service fair sharing equalizes
   (prompt tokens + 2 x completion tokens).

Prompts are a count ("1, 2, 3, 4,") so that every request runs to its max_tokens.

    .venv/bin/python benchmarks/bench_fairness.py [--seconds 40] [--b-requests 10]
        [--long-tokens 128] [--short-tokens 16] [--clients 8] [--fifo-cap 90] [--n-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from _stack import Stack, load_average, wait_for

from llmrelay.api.keys import add_key

PROMPT = "Count from 1 to 1000: 1, 2, 3, 4,"
SIZES = (16, 32, 64, 128)  # max_tokens of the four keys of the mixed run
MODES = [("fair", ("--fair-sharing", "on", "--fair-reserve", "1")),
         ("fair, no reserve", ("--fair-sharing", "on", "--fair-reserve", "0")),
         ("first come", ("--fair-sharing", "off"))]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else float("nan")


@dataclass
class Served:
    """Tokens one key was served inside the measured window."""

    completion: int = 0
    prompt: int = 0
    chunks_done: int = 0  # content chunks of finished requests ...
    tokens_done: int = 0  # ... and their usage: how well chunks count tokens
    arrivals: list[float] = field(default_factory=list)


class Client:
    def __init__(self, api: str, session: aiohttp.ClientSession) -> None:
        self.api = api
        self.session = session

    async def one(self, key: str, model: str, max_tokens: int, served: Served | None = None,
                  window: tuple[float, float] = (0.0, float("inf"))) -> float:
        """A streamed completion; returns its time to first token. With `served`, counts the
        content chunks (about one token each) and the prompt that arrive inside `window`."""
        t0 = time.perf_counter()
        ttft = None
        chunks = 0
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        async with self.session.post(self.api + "/v1/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if data.get("usage"):
                    if served is not None:
                        served.chunks_done += chunks
                        served.tokens_done += data["usage"]["completion_tokens"]
                        if ttft is not None and window[0] <= t0 + ttft <= window[1]:
                            served.prompt += data["usage"]["prompt_tokens"]
                    continue
                if data["choices"] and data["choices"][0].get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = now - t0
                    if served is not None and window[0] <= now <= window[1]:
                        served.completion += 1
        return ttft if ttft is not None else time.perf_counter() - t0

    async def loop(self, key: str, model: str, max_tokens: int, until: float,
                   served: Served | None = None,
                   window: tuple[float, float] = (0.0, float("inf"))) -> None:
        """Back-to-back requests until `until` (perf_counter time)."""
        while time.perf_counter() < until:
            await self.one(key, model, max_tokens, served, window)


def worker_status(url: str) -> dict:  # type: ignore[type-arg]
    return httpx.post(url + "/worker_get_status", timeout=10).json()


async def flood(client: Client, keys: dict[str, str], model: str, worker: str,
                args: argparse.Namespace, cap: float) -> tuple[list[float], list[float]]:
    """B's TTFTs alone, then under A's flood (at most `cap` seconds of B's requests)."""
    idle = [await client.one(keys["B"], model, args.short_tokens) for _ in range(args.b_requests)]
    stop = time.perf_counter() + 3600
    flooders = [asyncio.create_task(client.loop(keys["A"], model, args.long_tokens, stop))
                for _ in range(32)]
    for _ in range(100):  # until the worker is full and A's requests wait
        await asyncio.sleep(0.1)
        if worker_status(worker)["queue_length"] >= 30:
            break
    await asyncio.sleep(1.0)
    loaded: list[float] = []
    t_end = time.perf_counter() + cap
    try:
        while len(loaded) < args.b_requests and time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                loaded.append(await asyncio.wait_for(
                    client.one(keys["B"], model, args.short_tokens),
                    max(1.0, t_end - time.perf_counter())))
            except asyncio.TimeoutError:  # still waiting at the cap: at least that long
                loaded.append(-(time.perf_counter() - t0))
                break
            await asyncio.sleep(0.2)
    finally:
        for t in flooders:
            t.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)
    await drained(worker)
    return idle, loaded


async def mixed(client: Client, keys: dict[str, str], model: str, worker: str,
                args: argparse.Namespace) -> dict[int, Served]:
    """Four keys, `args.clients` streams each, requests of SIZES tokens; the first 5 s are not
    counted (the queue fills)."""
    t0 = time.perf_counter()
    window = (t0 + 5.0, t0 + 5.0 + args.seconds)
    served = {size: Served() for size in SIZES}
    tasks = [asyncio.create_task(client.loop(keys[f"k{i + 1}"], model, size, window[1],
                                             served[size], window))
             for i, size in enumerate(SIZES) for _ in range(args.clients)]
    await asyncio.sleep(window[1] - time.perf_counter())
    await asyncio.sleep(0.5)
    for t in tasks:  # requests still running past the window are not needed
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await drained(worker)
    return served


async def drained(worker: str) -> None:
    """Until the worker has ended the requests left behind (their clients are gone)."""
    for _ in range(1200):
        if worker_status(worker)["queue_length"] == 0:
            return
        await asyncio.sleep(0.1)
    print(f"  (worker {worker} still busy after 120 s)", flush=True)


async def run_all(api: str, keys: dict[str, str], workers: dict[str, str],
                  args: argparse.Namespace) -> dict[str, tuple]:  # type: ignore[type-arg]
    out = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(
            limit=200)) as session:
        client = Client(api, session)
        for name, _ in MODES:
            model = model_of(name)
            await client.one(keys["B"], model, 4)  # warm-up
            cap = args.fifo_cap if name == "first come" else 600.0
            idle, loaded = await flood(client, keys, model, workers[name], args, cap)
            print(f"  {name}: flood done (B: {len(loaded)} requests under load)", flush=True)
            served = await mixed(client, keys, model, workers[name], args)
            print(f"  {name}: mixed done", flush=True)
            out[name] = (idle, loaded, served)
    return out


def model_of(mode: str) -> str:
    return "smol-" + mode.replace(",", "").replace(" ", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0, help="measured window, mixed run")
    ap.add_argument("--b-requests", type=int, default=10, help="B's requests, alone and loaded")
    ap.add_argument("--long-tokens", type=int, default=128, help="A's requests")
    ap.add_argument("--short-tokens", type=int, default=16, help="B's requests")
    ap.add_argument("--clients", type=int, default=8, help="streams per key, mixed run")
    ap.add_argument("--fifo-cap", type=float, default=90.0,
                    help="seconds of B's requests under the flood, first come")
    ap.add_argument("--n-threads", type=int, default=1, help="llama.cpp threads per worker")
    ap.add_argument("--concurrency", type=int, default=4, help="--limit-worker-concurrency")
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="llmrelay-bench-fairness-"))
    keys_file = folder / "keys.toml"
    keys = {name: add_key(keys_file, name) for name in ["A", "B", "k1", "k2", "k3", "k4"]}
    load_before = load_average()
    stack = Stack()
    try:
        stack.start_controller()
        workers = {name: stack.start_worker(names=model_of(name), extra=(
            "--limit-worker-concurrency", str(args.concurrency), "--n-threads",
            str(args.n_threads), "--context-length", "2048", "--max-queue", "64", *flags))
            for name, flags in MODES}
        api = stack.start_api(extra=("--api-keys-file", str(keys_file), "--data-dir",
                                     str(folder / "data")))
        wait_for(lambda: len(httpx.get(api + "/v1/models", headers={
            "Authorization": f"Bearer {keys['A']}"}).json()["data"]) == len(MODES), 60,
            "the models")
        results = asyncio.run(run_all(api, keys, workers, args))
    finally:
        stack.stop()

    print(f"\nSmolLM2-135M Q4_1, one worker per row, --limit-worker-concurrency {args.concurrency}, "
          f"{args.n_threads} llama.cpp threads, streamed /v1/completions, temperature 0\n")
    print(f"Flood: key A keeps 32 requests of {args.long_tokens} tokens in flight; key B sends "
          f"{args.b_requests} requests of {args.short_tokens} tokens one at a time (B's time to "
          "first token, ms)\n")
    print("| worker | B alone p50 | B alone p95 | B under flood p50 | B under flood p95 | "
          "p95 / alone p95 | B requests under flood |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, _ in MODES:
        idle, loaded, _ = results[name]
        # a request still waiting at the cap counts as its wait so far (a lower bound: ">")
        cut = any(x < 0 for x in loaded)
        ms = [abs(x) * 1000 for x in loaded]
        alone = [x * 1000 for x in idle]
        gt = ">" if cut else ""
        print(f"| {name} | {statistics.median(alone):.0f} | {pct(alone, 95):.0f} | "
              f"{gt}{statistics.median(ms):.0f} | {gt}{pct(ms, 95):.0f} | "
              f"{gt}{pct(ms, 95) / pct(alone, 95):.1f} | {len(ms)}"
              f"{f' ({args.fifo_cap:.0f} s cap reached)' if cut else ''} |")
    print(f"\nMixed: four keys, {args.clients} streams each, back to back, requests of "
          f"{', '.join(map(str, SIZES))} tokens; {args.seconds:.0f} s measured (completion "
          "tokens served to each key inside the window)\n")
    print("| worker | " + " | ".join(f"key of {s}-token requests" for s in SIZES)
          + " | total tok/s | Jain, completion tokens | Jain, prompt + 2 x completion |")
    print("|---|" + "---:|" * (len(SIZES) + 3))
    for name, _ in MODES:
        served = results[name][2]
        comp = [served[s].completion for s in SIZES]
        weighted = [served[s].prompt + 2 * served[s].completion for s in SIZES]
        print(f"| {name} | " + " | ".join(map(str, comp))
              + f" | {sum(comp) / args.seconds:.0f} | {jain(comp):.3f} | {jain(weighted):.3f} |")
    ratio = [served[s].tokens_done / served[s].chunks_done
             for _, _, served in results.values() for s in SIZES if served[s].chunks_done] or [0]
    print(f"\n(tokens per streamed chunk, finished requests: {min(ratio):.2f} to {max(ratio):.2f};"
          f" before: {load_before}; after: {load_average()})")


if __name__ == "__main__":
    main()
