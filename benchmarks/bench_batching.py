"""Continuous batching through the full stack against raw llama-cpp-python, in one run.

Starts a controller, one SmolLM2 worker (llamacpp engine, batching up to 8 sequences) and the
API server on free loopback ports, then runs 1, 4 and 8 concurrent streaming clients; each
client sends `--rounds` chat requests one after another. Raw llama-cpp-python
(`Llama.create_chat_completion`, streaming, same model, prompt and threads) generates alone in
the same run. Prints total completion tokens/s, time to first token and latency (p50/p95), and
ratios against 1 client and against raw.

The clients run in a separate process (`--clients-in process`, the default; as a real client
would, it does not share this script's interpreter and GIL) and are one of: the standard
library's http.client scanning the raw stream (`--client raw`, the default: the least CPU taken
from the two cores being measured), plain httpx reading the SSE lines (`--client httpx`), or the
official `openai` SDK (`--client sdk`, which parses every chunk into pydantic objects).
`--clients-in thread` runs them as threads of this script, as the first version did.

    .venv/bin/python benchmarks/bench_batching.py [--rounds 3] [--repeat 3] [--max-tokens 64]
        [--client raw|httpx|sdk] [--clients-in process|thread] [--n-threads 2]
        [--worker-args "--stream-interval 2"] [--plot docs/batching.svg]

`--plot FILE.svg` also draws total tokens/s against the number of clients, with raw
llama-cpp-python alone as a dashed line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import httpx
import openai
from _plot import line_chart
from _stack import Stack, load_average

TOPICS = ["a dragon", "a lighthouse", "the sea", "a robot", "a garden", "a city at night",
          "a lost key", "a mountain", "a violin", "a storm", "a fox", "a library"]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me a long story about {TOPICS[i % len(TOPICS)]}."}]


@dataclass
class Result:
    ttft: float
    latency: float
    tokens: int


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def one_request_httpx(client: httpx.Client, i: int, max_tokens: int) -> Result:
    """The same request with httpx, reading SSE lines and parsing only what it needs."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    body = {"model": "smol", "messages": messages(i), "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None and '"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - t0
            if '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    end = time.perf_counter() - t0
    return Result(ttft if ttft is not None else end, end, tokens)


def one_request_raw(conn: http.client.HTTPConnection, i: int, max_tokens: int) -> Result:
    """The same request over the standard library's http.client, scanning the raw bytes: the
    lightest client here (a load generator sharing the two measured cores should cost little);
    tokens are counted from the final `usage` chunk, as with the other clients."""
    t0 = time.perf_counter()
    ttft = None
    body = json.dumps({"model": "smol", "messages": messages(i), "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    tail = b""
    while data := r.read1(65536):
        if ttft is None and b'"content":"' in data.replace(b'"content":""', b""):
            ttft = time.perf_counter() - t0
        tail = (tail + data)[-4096:]
    end = time.perf_counter() - t0
    usage = tail.rfind(b'"usage":{')
    tokens = json.JSONDecoder().raw_decode(tail[usage + 8:].decode())[0]["completion_tokens"]
    return Result(ttft if ttft is not None else end, end, tokens)


def one_request(client: openai.OpenAI, i: int, max_tokens: int) -> Result:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    stream = client.chat.completions.create(
        model="smol", messages=messages(i), max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})  # type: ignore[arg-type]
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter() - t0
    return Result(ttft if ttft is not None else end, end, tokens)


def run_clients(api: str, n: int, rounds: int, max_tokens: int, kind: str = "sdk"
                ) -> tuple[list[Result], float]:
    """`n` client threads in this process, each sending `rounds` requests one at a time."""
    results: list[Result] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        if kind == "sdk":
            client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0,
                                   timeout=300)
            one = one_request
        elif kind == "httpx":
            client = httpx.Client(base_url=api, timeout=300)  # type: ignore[assignment]
            one = one_request_httpx  # type: ignore[assignment]
        else:
            u = urlsplit(api)
            client = http.client.HTTPConnection(u.hostname, u.port, timeout=300)  # type: ignore
            one = one_request_raw  # type: ignore[assignment]
        for r in range(rounds):
            res = one(client, c * rounds + r, max_tokens)  # type: ignore[arg-type]
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def run_clients_process(api: str, n: int, rounds: int, max_tokens: int, kind: str
                        ) -> tuple[list[Result], float, float]:
    """`run_clients` in a child process; also returns the CPU seconds that process used."""
    out = subprocess.run(
        [sys.executable, __file__, "--load", api, "--clients", str(n), "--rounds", str(rounds),
         "--max-tokens", str(max_tokens), "--client", kind],
        check=True, capture_output=True, text=True, timeout=900)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return [Result(**r) for r in data["results"]], data["wall"], data["cpu"]


def load_main(args: argparse.Namespace) -> None:
    """The child side of `run_clients_process`: run the clients, print the results as JSON."""
    res, wall = run_clients(args.load, int(args.clients), args.rounds, args.max_tokens,
                            args.client)
    print(json.dumps({"results": [asdict(r) for r in res], "wall": wall,
                      "cpu": time.process_time()}))


def run_raw(llm: object, n: int, max_tokens: int) -> tuple[list[Result], float]:
    """`n` streaming chat completions one after another on a plain `Llama` object."""
    results = []
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        for chunk in llm.create_chat_completion(  # type: ignore[attr-defined]
                messages=messages(i), max_tokens=max_tokens, temperature=0, stream=True):
            delta = chunk["choices"][0]["delta"]
            if delta.get("content"):
                tokens += 1  # one chunk per token in llama-cpp-python's stream
                if ttft is None:
                    ttft = time.perf_counter() - t0
        end = time.perf_counter() - t0
        results.append(Result(ttft or end, end, tokens))
    return results, time.perf_counter() - t_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="requests per client, one at a time")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--repeat", type=int, default=3, help="alternating repeats of every side")
    ap.add_argument("--n-threads", type=int, default=2, help="llama.cpp threads (both sides)")
    ap.add_argument("--client", choices=["raw", "httpx", "sdk"], default="raw")
    ap.add_argument("--clients-in", choices=["process", "thread"], default="process")
    ap.add_argument("--worker-args", default="", help="extra worker flags, one string")
    ap.add_argument("--plot", help="also write an SVG chart of tok/s by clients to this file")
    ap.add_argument("--load", help=argparse.SUPPRESS)  # internal: be the client process
    args = ap.parse_args()
    if args.load:
        load_main(args)
        return
    levels = [int(x) for x in args.clients.split(",")]

    from llama_cpp import Llama  # only the benchmark's own baseline imports the library

    from llmrelay.worker.models import resolve

    llm = Llama(model_path=str(resolve("smollm2").path), n_ctx=2048, n_threads=args.n_threads,
                verbose=False)
    llm.create_chat_completion(messages=messages(0), max_tokens=4, temperature=0)  # warm-up
    names = ["raw llama-cpp-python, alone"] + [
        f"llmrelay, {n} client{'s' if n > 1 else ''}" for n in levels]
    trials: dict[str, list[tuple[list[Result], float]]] = {name: [] for name in names}
    cpu_notes: list[str] = []
    load_before = load_average()
    stack = Stack()
    try:
        stack.start_controller()
        stack.start_worker(extra=("--limit-worker-concurrency", str(max(levels)),
                                  "--context-length", "2048",
                                  "--n-threads", str(args.n_threads),
                                  *shlex.split(args.worker_args)))
        api = stack.start_api()
        stack.wait_models(1)
        run_clients(api, 1, 1, 8, args.client)  # warm-up
        # Sides alternate within each repeat, so a noisy neighbour hits them alike.
        for rep in range(args.repeat):
            trials[names[0]].append(run_raw(llm, max(3, args.rounds), args.max_tokens))
            for name, n in zip(names[1:], levels, strict=True):
                cpu0, own0 = stack.cpu_seconds(), time.process_time()
                if args.clients_in == "process":
                    res, wall, client_cpu = run_clients_process(api, n, args.rounds,
                                                                args.max_tokens, args.client)
                else:
                    res, wall = run_clients(api, n, args.rounds, args.max_tokens, args.client)
                    client_cpu = time.process_time() - own0
                cpu1 = stack.cpu_seconds()
                trials[name].append((res, wall))
                if rep == 0:
                    cpu_notes.append(f"{n} clients, {wall:.1f} s: " + ", ".join(
                        f"{k.split()[0]} {cpu1[k] - cpu0.get(k, 0):.1f}" for k in cpu1)
                        + f", clients {client_cpu:.1f}")
    finally:
        stack.stop()
        llm.close()

    def tps(name: str) -> float:  # median over repeats of total completion tokens / wall
        return statistics.median(sum(r.tokens for r in res) / wall for res, wall in trials[name])

    raw_tps = tps(names[0])
    one = tps(names[1]) if levels and levels[0] == 1 else raw_tps
    print(f"\nSmolLM2-135M Q4_1, {args.max_tokens} max tokens, {args.rounds} requests per client, "
          f"{args.repeat} repeats (tok/s: median of repeats; times: all requests), "
          f"{args.n_threads} llama.cpp threads, temperature 0, streaming, {args.client} "
          f"clients in a {args.clients_in}"
          f"{', worker ' + args.worker_args if args.worker_args else ''}\n")
    print("| run | requests | tok/s total | vs 1 client | vs raw | TTFT p50 ms | TTFT p95 ms "
          "| latency p50 ms | latency p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        res = [r for rs, _ in trials[name] for r in rs]
        t = tps(name)
        ttft = [r.ttft * 1000 for r in res]
        lat = [r.latency * 1000 for r in res]
        print(f"| {name} | {len(res)} | {t:.1f} | {t / one:.2f} | {t / raw_tps:.2f} | "
              f"{statistics.median(ttft):.0f} | {pct(ttft, 95):.0f} | "
              f"{statistics.median(lat):.0f} | {pct(lat, 95):.0f} |")
    print(f"\nbefore: {load_before}; after: {load_average()}")
    print("\nCPU seconds used per process during each run:")
    for note in cpu_notes:
        print("  " + note)
    if args.plot:
        worker = f" ({args.worker_args})" if args.worker_args else ""
        line_chart(args.plot, f"Continuous batching: SmolLM2 on {args.n_threads} llama.cpp "
                   f"threads, {args.max_tokens} tokens per answer", "concurrent streaming clients",
                   "completion tokens/s, total",
                   {f"llmrelay{worker}": [(n, tps(name)) for name, n in zip(names[1:], levels,
                                                                            strict=True)]},
                   hlines={"raw llama-cpp-python, alone": raw_tps})
        print(f"\nchart: {args.plot}")


if __name__ == "__main__":
    main()
