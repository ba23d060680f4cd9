"""Routing overhead: our API server + controller against calling the worker directly and against
FastChat 0.2.36's controller + openai_api_server, all in front of the same synthetic worker.

One worker runs the synthetic engine (`--engine synthetic`: fixed words streamed instantly, no
model) and registers with two controllers: ours and FastChat's (from the cached FastChat venv,
tests/fastchat_env.py). In front of it: our API server (on our controller) and FastChat's
openai_api_server (on FastChat's controller). Sides, in one run:

- `worker direct`: POST /worker_generate_stream (or /worker_generate) on the worker, with the
  body our API server sends it (chat messages, delta frames);
- `llmrelay API`: POST /v1/chat/completions on our API server;
- `FastChat API`: POST /v1/chat/completions on FastChat's API server;

each streaming and non-streaming. Latency: one client sending requests one after another (the
whole response read); added latency = a side's p50 (p95) minus the direct call's. Throughput:
`--concurrency` clients (asyncio httpx, in this process) sending requests back to back for
`--seconds`; requests/s. Sides alternate (order reversed every other round) so a noisy
neighbour hits them alike; medians over rounds.

    .venv/bin/python benchmarks/bench_routing.py [--rounds 5] [--requests 100]
        [--concurrency 16] [--seconds 3] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from _stack import Stack, free_port, load_average, spawn, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fastchat_env import build_fastchat_env  # noqa: E402

MODEL = "synth"
MESSAGES = [{"role": "user", "content": "Say something."}]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


class Side:
    """How to send one request of one kind to one target (sync and async)."""

    def __init__(self, name: str, base: str, path: str, body: dict, stream: bool,
                 done: Callable[[bytes], bool]) -> None:
        self.name, self.base, self.path, self.body, self.stream = name, base, path, body, stream
        self.done = done  # checks the response really carried the whole answer

    def once(self, client: httpx.Client) -> float:
        t0 = time.perf_counter()
        if self.stream:
            with client.stream("POST", self.base + self.path, json=self.body) as r:
                data = b"".join(r.iter_raw())
        else:
            r = client.post(self.base + self.path, json=self.body)
            data = r.content
        dt = time.perf_counter() - t0
        if r.status_code != 200 or not self.done(data):
            raise RuntimeError(f"{self.name}: bad answer {r.status_code} {data[-300:]!r}")
        return dt

    async def once_async(self, client: httpx.AsyncClient) -> None:
        if self.stream:
            async with client.stream("POST", self.base + self.path, json=self.body) as r:
                data = b"".join([c async for c in r.aiter_raw()])
        else:
            r = await client.post(self.base + self.path, json=self.body)
            data = r.content
        if r.status_code != 200 or not self.done(data):
            raise RuntimeError(f"{self.name}: bad answer {r.status_code} {data[-300:]!r}")


def sides(worker: str, ours: str, fastchat: str, max_tokens: int) -> list[Side]:
    worker_body = {"model": MODEL, "messages": MESSAGES, "max_new_tokens": max_tokens,
                   "temperature": 0.7, "delta": True, "echo": False, "request_id": "bench"}
    words = " ".join("The quick brown fox jumps over the lazy dog .".split()[:3])

    def chat(stream: bool) -> dict:
        return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream}

    def sse_done(data: bytes) -> bool:
        return data.rstrip().endswith(b"data: [DONE]") and b"error" not in data

    def json_done(data: bytes) -> bool:
        return words.encode() in data and b"error\":{" not in data

    out = []
    for stream in (True, False):
        kind = "stream" if stream else "non-stream"
        out.append(Side(f"worker direct, {kind}", worker,
                        "/worker_generate_stream" if stream else "/worker_generate",
                        worker_body, stream,
                        lambda d: b'"finish_reason":"length"' in d.replace(b" ", b"")))
        out.append(Side(f"llmrelay API, {kind}", ours, "/v1/chat/completions", chat(stream),
                        stream, sse_done if stream else json_done))
        out.append(Side(f"FastChat API, {kind}", fastchat, "/v1/chat/completions", chat(stream),
                        stream, sse_done if stream else json_done))
    return out


def latency_round(side: Side, n: int, client: httpx.Client) -> list[float]:
    return [side.once(client) for _ in range(n)]


async def throughput_round(side: Side, concurrency: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        done = 0
        end = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await side.once_async(client)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(stack: Stack, fc_python: Path) -> tuple[str, str, str, dict[str, int]]:
    """Our controller + API server, FastChat's controller + API server, one synthetic worker
    registered with both controllers. Returns the worker's and both API servers' addresses,
    and the API servers' process ids."""
    ours = stack.start_controller()
    fc_port, fc_api_port = free_port(), free_port()
    fc_controller = f"http://127.0.0.1:{fc_port}"
    fc_api = f"http://127.0.0.1:{fc_api_port}"
    env = {"LOGDIR": str(stack.logs), "CUDA_VISIBLE_DEVICES": ""}
    stack.procs.append(spawn([str(fc_python), "-m", "fastchat.serve.controller", "--host",
                              "127.0.0.1", "--port", str(fc_port)],
                             stack.logs / "fastchat-controller.log", env, stack.logs))
    wait_for(lambda: httpx.post(fc_controller + "/list_models").status_code == 200, 60,
             "FastChat's controller")
    worker = stack.start_worker(names=MODEL, extra=(
        "--engine", "synthetic", "--controller-address", f"{ours},{fc_controller}",
        "--limit-worker-concurrency", "256", "--max-queue", "256"))
    stack.start_api()
    our_api = stack.procs[-1]
    fc_api_proc = spawn([str(fc_python), "-m", "fastchat.serve.openai_api_server",
                         "--host", "127.0.0.1", "--port", str(fc_api_port),
                         "--controller-address", fc_controller],
                        stack.logs / "fastchat-api.log", env, stack.logs)
    stack.procs.append(fc_api_proc)
    wait_for(lambda: MODEL in httpx.get(fc_api + "/v1/models").text, 120, "FastChat's API server")
    stack.wait_models(1)
    return worker, stack.api, fc_api, {"llmrelay API": our_api.pid,
                                       "FastChat API": fc_api_proc.pid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=100, help="sequential requests per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput round")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    fc_python = build_fastchat_env()
    load_before = load_average()
    stack = Stack()
    lat: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    try:
        worker, ours, fastchat, pids = start(stack, fc_python)
        all_sides = sides(worker, ours, fastchat, args.max_tokens)
        with httpx.Client(timeout=60) as client:
            for s in all_sides:  # warm-up (FastChat caches the conversation template)
                latency_round(s, 5, client)
            for r in range(args.rounds):
                order = all_sides if r % 2 == 0 else all_sides[::-1]
                for s in order:
                    lat.setdefault(s.name, []).extend(latency_round(s, args.requests, client))
                for s in order:
                    pid = pids.get(s.name.split(",")[0])
                    before = cpu_of(pid) if pid else 0.0
                    rps.setdefault(s.name, []).append(asyncio.run(
                        throughput_round(s, args.concurrency, args.seconds)))
                    if pid:
                        cpu[s.name] = cpu.get(s.name, 0.0) + cpu_of(pid) - before
    finally:
        stack.stop()

    print(f"\nSynthetic worker ({args.max_tokens} tokens per answer, instantly); latency: "
          f"{args.rounds} x {args.requests} sequential requests per side; throughput: "
          f"{args.concurrency} concurrent clients, {args.rounds} x {args.seconds:.0f} s per side; "
          f"sides alternating\n")
    print("| side | p50 ms | p95 ms | added p50 ms | added p95 ms | req/s (median) | "
          "req/s vs FastChat | API server CPU ms / request |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("stream", "non-stream"):
        direct = [x * 1000 for x in lat[f"worker direct, {kind}"]]
        fc_rps = statistics.median(rps[f"FastChat API, {kind}"])
        for who in ("worker direct", "llmrelay API", "FastChat API"):
            name = f"{who}, {kind}"
            v = [x * 1000 for x in lat[name]]
            p50, p95 = statistics.median(v), pct(v, 95)
            added = ("| " if who == "worker direct" else
                     f"{p50 - statistics.median(direct):.2f} | {p95 - pct(direct, 95):.2f}")
            med = statistics.median(rps[name])
            per = (f"{cpu[name] * 1000 / (sum(rps[name]) * args.seconds):.2f}"
                   if name in cpu else "")
            print(f"| {name} | {p50:.2f} | {p95:.2f} | {added} | {med:.0f} | "
                  f"{med / fc_rps:.2f} | {per} |")
    ratios = []
    for kind in ("stream", "non-stream"):
        d = statistics.median(lat[f"worker direct, {kind}"])
        o = statistics.median(lat[f"llmrelay API, {kind}"]) - d
        f = statistics.median(lat[f"FastChat API, {kind}"]) - d
        ratios.append(f"{kind}: llmrelay adds {o * 1000:.2f} ms p50, FastChat {f * 1000:.2f} ms "
                      f"({o / f:.2f}x)")
    print("\n" + "\n".join(ratios))
    print(f"\nbefore: {load_before}; after: {load_average()}")


if __name__ == "__main__":
    main()
