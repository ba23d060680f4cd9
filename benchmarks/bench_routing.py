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

`--keys`: our API servers require an API key (a keys file with one key, as `llmrelay keys add`
makes it; usage is then counted under its name). `--baseline SRC`: a second llmrelay API server
run from another source tree's `src` folder (e.g. a `git worktree` of an older commit), on the
same controller and worker, as the side `llmrelay baseline API`: two versions compared in one
run. `--no-fastchat`: leave FastChat's sides out (no FastChat venv needed).

    .venv/bin/python benchmarks/bench_routing.py [--rounds 5] [--requests 100]
        [--concurrency 16] [--seconds 3] [--max-tokens 16] [--keys] [--baseline SRC]
        [--no-fastchat]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from _stack import Stack, free_port, load_average, spawn, wait_for

from llmrelay.api.keys import add_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fastchat_env import build_fastchat_env  # noqa: E402

MODEL = "synth"
MESSAGES = [{"role": "user", "content": "Say something."}]
OURS = "llmrelay API"
BASELINE = "llmrelay baseline API"
FASTCHAT = "FastChat API"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


class Side:
    """How to send one request of one kind to one target (sync and async)."""

    def __init__(self, name: str, base: str, path: str, body: dict, stream: bool,
                 done: Callable[[bytes], bool], headers: dict[str, str] | None = None) -> None:
        self.name, self.base, self.path, self.body, self.stream = name, base, path, body, stream
        self.done = done  # checks the response really carried the whole answer
        self.headers = headers or {}

    def once(self, client: httpx.Client) -> float:
        t0 = time.perf_counter()
        if self.stream:
            with client.stream("POST", self.base + self.path, json=self.body,
                               headers=self.headers) as r:
                data = b"".join(r.iter_raw())
        else:
            r = client.post(self.base + self.path, json=self.body, headers=self.headers)
            data = r.content
        dt = time.perf_counter() - t0
        if r.status_code != 200 or not self.done(data):
            raise RuntimeError(f"{self.name}: bad answer {r.status_code} {data[-300:]!r}")
        return dt

    async def once_async(self, client: httpx.AsyncClient) -> None:
        if self.stream:
            async with client.stream("POST", self.base + self.path, json=self.body,
                                     headers=self.headers) as r:
                data = b"".join([c async for c in r.aiter_raw()])
        else:
            r = await client.post(self.base + self.path, json=self.body, headers=self.headers)
            data = r.content
        if r.status_code != 200 or not self.done(data):
            raise RuntimeError(f"{self.name}: bad answer {r.status_code} {data[-300:]!r}")


def sides(worker: str, apis: dict[str, str], max_tokens: int,
          headers: dict[str, str]) -> list[Side]:
    """The worker called directly, then each API server of `apis` (name -> URL); ours (not
    FastChat's) with `headers` (the API key)."""
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
        for who, url in apis.items():
            out.append(Side(f"{who}, {kind}", url, "/v1/chat/completions", chat(stream), stream,
                            sse_done if stream else json_done,
                            None if who == FASTCHAT else headers))
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


def start_ours(stack: Stack, argv: list[str], src: str | None, name: str) -> tuple[str, int]:
    """One of our API servers on our controller (from `src` when given: PYTHONPATH)."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "llmrelay.cli", "api", "--port", str(port),
                  "--controller-address", stack.controller, "--table-refresh", "0.5", *argv],
                 stack.logs / f"{name}.log", {"PYTHONPATH": src} if src else None)
    stack.procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/health").status_code == 200, 60, f"the {name} server")
    return url, proc.pid


def start(stack: Stack, fc_python: Path | None, keys: str | None, baseline: str | None
          ) -> tuple[str, dict[str, str], dict[str, int]]:
    """Our controller + API server (and the baseline's), FastChat's controller + API server
    (unless `fc_python` is None), one synthetic worker registered with both controllers.
    Returns the worker's address, the API servers' names -> addresses and process ids."""
    ours = stack.start_controller()
    controllers = ours
    env = {"LOGDIR": str(stack.logs), "CUDA_VISIBLE_DEVICES": ""}
    if fc_python is not None:
        fc_port, fc_api_port = free_port(), free_port()
        fc_controller = f"http://127.0.0.1:{fc_port}"
        fc_api = f"http://127.0.0.1:{fc_api_port}"
        controllers = f"{ours},{fc_controller}"
        stack.procs.append(spawn([str(fc_python), "-m", "fastchat.serve.controller", "--host",
                                  "127.0.0.1", "--port", str(fc_port)],
                                 stack.logs / "fastchat-controller.log", env, stack.logs))
        wait_for(lambda: httpx.post(fc_controller + "/list_models").status_code == 200, 60,
                 "FastChat's controller")
    worker = stack.start_worker(names=MODEL, extra=(
        "--engine", "synthetic", "--controller-address", controllers,
        "--limit-worker-concurrency", "256", "--max-queue", "256"))
    apis: dict[str, str] = {}
    pids: dict[str, int] = {}
    for name, src in ((OURS, None), *(((BASELINE, baseline),) if baseline else ())):
        argv = ["--data-dir", str(stack.logs / f"data-{len(apis)}")]
        if keys:
            argv += ["--api-keys-file", keys]
        apis[name], pids[name] = start_ours(stack, argv, src, name.replace(" ", "-"))
    if fc_python is not None:
        fc_api_proc = spawn([str(fc_python), "-m", "fastchat.serve.openai_api_server",
                             "--host", "127.0.0.1", "--port", str(fc_api_port),
                             "--controller-address", fc_controller],
                            stack.logs / "fastchat-api.log", env, stack.logs)
        stack.procs.append(fc_api_proc)
        wait_for(lambda: MODEL in httpx.get(fc_api + "/v1/models").text, 120,
                 "FastChat's API server")
        apis[FASTCHAT], pids[FASTCHAT] = fc_api, fc_api_proc.pid
    return worker, apis, pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=100, help="sequential requests per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput round")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--keys", action="store_true", help="our API servers require an API key")
    ap.add_argument("--baseline", metavar="SRC", default=None,
                    help="also run an API server from this source tree's src folder")
    ap.add_argument("--no-fastchat", action="store_true", help="leave FastChat's sides out")
    args = ap.parse_args()
    fc_python = None if args.no_fastchat else build_fastchat_env()
    load_before = load_average()
    stack = Stack()
    headers: dict[str, str] = {}
    keys_file = None
    if args.keys:
        keys_file = str(Path(tempfile.mkdtemp(prefix="llmrelay-bench-keys-")) / "keys.toml")
        headers = {"Authorization": f"Bearer {add_key(Path(keys_file), 'bench')}"}
    lat: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    try:
        worker, apis, pids = start(stack, fc_python, keys_file, args.baseline)
        for name, url in apis.items():
            wait_for(lambda url=url, name=name: MODEL in httpx.get(
                url + "/v1/models", headers=None if name == FASTCHAT else headers).text, 60,
                f"the model in the {name} server")
        time.sleep(1.0)  # one table refresh more, so every API server sees the worker
        all_sides = sides(worker, apis, args.max_tokens, headers)
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
          f"sides alternating{'; API keys on' if args.keys else ''}\n")
    ref = FASTCHAT if FASTCHAT in apis else BASELINE if BASELINE in apis else OURS
    print("| side | p50 ms | p95 ms | added p50 ms | added p95 ms | req/s (median) | "
          f"req/s vs {ref} | API server CPU ms / request |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("stream", "non-stream"):
        direct = [x * 1000 for x in lat[f"worker direct, {kind}"]]
        ref_rps = statistics.median(rps[f"{ref}, {kind}"])
        for who in ("worker direct", *apis):
            name = f"{who}, {kind}"
            v = [x * 1000 for x in lat[name]]
            p50, p95 = statistics.median(v), pct(v, 95)
            added = ("| " if who == "worker direct" else
                     f"{p50 - statistics.median(direct):.2f} | {p95 - pct(direct, 95):.2f}")
            med = statistics.median(rps[name])
            per = (f"{cpu[name] * 1000 / (sum(rps[name]) * args.seconds):.2f}"
                   if name in cpu else "")
            print(f"| {name} | {p50:.2f} | {p95:.2f} | {added} | {med:.0f} | "
                  f"{med / ref_rps:.2f} | {per} |")
    ratios = []
    for kind in ("stream", "non-stream"):
        d = statistics.median(lat[f"worker direct, {kind}"])
        added = {who: statistics.median(lat[f"{who}, {kind}"]) - d for who in apis}
        line = f"{kind}: " + ", ".join(f"{who} adds {a * 1000:.2f} ms p50"
                                        for who, a in added.items())
        if ref != OURS:
            line += f" (llmrelay / {ref}: {added[OURS] / added[ref]:.2f}x)"
        ratios.append(line)
    print("\n" + "\n".join(ratios))
    print(f"\nbefore: {load_before}; after: {load_average()}")


if __name__ == "__main__":
    main()
