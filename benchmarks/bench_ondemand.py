"""Models on demand: cold start to the first token per bundled model, and a swap-heavy workload.

1. Cold start: a host declares SmolLM2, Gemma 3 270M and all-MiniLM-L6-v2 (budget for all). For
   each model and run, the model is unloaded (admin endpoint), then one streamed chat request
   (an embeddings request for MiniLM) is timed to its first token (answer), then the same
   request again on the loaded model (warm). Printed: median cold and warm times, their
   difference (what loading on demand costs) and the host's own load time.
2. Swaps: three models (SmolLM2 as `a` and `b`, Gemma 3 270M as `g`) with a budget for any two,
   8 clients each sending `--requests` chat requests (8 tokens) for a model picked at random
   (seeded), one after the other. Printed: errors (non-200 answers; the goal is 0), latency
   median / p95 / max, wall time, loads and evictions.

    .venv/bin/python benchmarks/bench_ondemand.py [--runs 3] [--requests 6] [--clients 8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _stack import Stack, free_port, load_average, wait_for

from llmrelay.ondemand.catalog import spec_from_entry
from llmrelay.ondemand.estimate import estimate

KEY = "bench-admin"
SMALL = {"context_length": 512, "limit_worker_concurrency": 4, "n_threads": 1}
HI = [{"role": "user", "content": "Say hello."}]


def start(stack: Stack, models: dict[str, dict[str, Any]], budget: int) -> str:
    catalog = stack.logs / "catalog.toml"
    lines = []
    for name, entry in models.items():
        lines += ["[[model]]", f'model_names = ["{name}"]']
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in entry.items()]
    catalog.write_text("\n".join(lines) + "\n")
    port = free_port()
    stack._start("host", ["host", "--port", str(port), "--controller-address", stack.controller,
                          "--heartbeat-interval", "1", "--catalog", str(catalog),
                          "--max-memory", str(budget), "--admin-key", KEY])
    host = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(host + "/test_connection").status_code == 200, 60, "the host")
    return host


def admin(host: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    r = httpx.request("POST" if body else "GET", host + path, json=body, timeout=600,
                      headers={"Authorization": f"Bearer {KEY}"})
    r.raise_for_status()
    return r.json()


def first_token(api: str, model: str, embedding: bool) -> float:
    t0 = time.perf_counter()
    if embedding:
        r = httpx.post(api + "/v1/embeddings", json={"model": model, "input": ["hello"]},
                       timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0
    body = {"model": model, "messages": HI, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", api + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line:
                return time.perf_counter() - t0
    raise RuntimeError(f"{model}: no token in the answer")


def cold_starts(runs: int) -> None:
    stack = Stack()
    try:
        stack.start_controller()
        models = {"smollm2": {"model_path": "smollm2", **SMALL},
                  "gemma3-270m": {"model_path": "gemma3-270m", **SMALL},
                  "all-minilm-l6-v2": {"model_path": "all-minilm-l6-v2",
                                       "limit_worker_concurrency": 4, "n_threads": 1}}
        host = start(stack, models, 8 * 1024**3)
        api = stack.start_api()
        wait_for(lambda: len(httpx.get(api + "/v1/models").json()["data"]) == 3, 30, "models")
        rows = []
        for name in models:
            cold, warm, load = [], [], []
            for _ in range(runs):
                admin(host, "/admin/unload", {"model": name})
                wait_for(lambda name=name: next(m["state"] for m in httpx.get(
                    api + "/v1/models").json()["data"] if m["id"] == name) == "unloaded", 30,
                    "unloaded")
                log_mark = (stack.logs / "host.log").stat().st_size
                cold.append(first_token(api, name, name.startswith("all-")))
                warm.append(first_token(api, name, name.startswith("all-")))
                load.append(_load_time(stack.logs / "host.log", log_mark, name))
                print(f"{name}: cold {cold[-1]:.2f} s, warm {warm[-1]:.3f} s, host load "
                      f"{load[-1]:.2f} s", flush=True)
            rows.append((name, statistics.median(cold), statistics.median(warm),
                         statistics.median(load)))
        print(f"\ncold start to the first token, {runs} runs each (median); {load_average()}\n")
        print("| model | cold: first token s | warm: first token s | cost of the cold start s "
              "| host: process start to ready s |")
        print("|---|---:|---:|---:|---:|")
        for name, c, w, ld in rows:
            print(f"| {name} | {c:.2f} | {w:.3f} | {c - w:.2f} | {ld:.2f} |")
    finally:
        stack.stop()


def _load_time(log: Path, start: int, name: str) -> float:
    """Seconds between the host's 'loading NAME' and 'NAME loaded' lines after `start`."""
    from datetime import datetime

    text = log.read_bytes()[start:].decode(errors="replace")
    marks = {}
    for line in text.splitlines():
        if line.startswith("[") or " llmrelay.host: " not in line:
            continue
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if f"loading {name} (" in line:
            marks["start"] = stamp
        elif f"{name} loaded (pid" in line:
            marks["end"] = stamp
    return marks.get("end", 0) - marks.get("start", 0)


def swaps(clients: int, requests: int, seed: int) -> None:
    stack = Stack()
    try:
        stack.start_controller()
        smol = {"model_path": "smollm2", **SMALL}
        gemma = {"model_path": "gemma3-270m", **SMALL}
        s = estimate(spec_from_entry(dict(smol), "bench")).total
        g = estimate(spec_from_entry(dict(gemma), "bench")).total
        budget = s + g + s // 2  # any two, never three
        host = start(stack, {"a": smol, "b": smol, "g": gemma}, budget)
        api = stack.start_api()
        wait_for(lambda: len(httpx.get(api + "/v1/models").json()["data"]) == 3, 30, "models")
        rng = random.Random(seed)
        plan = [[rng.choice("abg") for _ in range(requests)] for _ in range(clients)]
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(models: list[str]) -> None:
            with httpx.Client(timeout=900) as c:
                for m in models:
                    t0 = time.perf_counter()
                    try:
                        r = c.post(api + "/v1/chat/completions", json={
                            "model": m, "messages": HI, "max_tokens": 8, "temperature": 0})
                        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
                        why = "" if ok else f"{m}: {r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as e:
                        why = f"{m}: {type(e).__name__} {e}"
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if why:
                            errors.append(why)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(p,)) for p in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        listing = admin(host, "/admin/models")["models"]
        loads = sum(m["loads"] for m in listing)
        evictions = sum(m["evictions"] for m in listing)
        lat = sorted(latencies)
        p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
        print(f"\nswap-heavy: 3 models (SmolLM2 a, SmolLM2 b, Gemma 3 270M g), budget for two "
              f"({budget / 2**20:.0f} MiB), {clients} clients x {requests} requests; "
              f"{load_average()}\n")
        print("| requests | errors | latency median s | p95 s | max s | wall s | loads | "
              "evictions |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {len(lat)} | {len(errors)} | {statistics.median(lat):.2f} | {p95:.2f} | "
              f"{lat[-1]:.2f} | {wall:.1f} | {loads} | {evictions} |")
        for e in errors[:10]:
            print("error:", e)
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["cold", "swaps"], default=None)
    args = ap.parse_args()
    print(f"before: {load_average()}")
    if args.only in (None, "cold"):
        cold_starts(args.runs)
    if args.only in (None, "swaps"):
        swaps(args.clients, args.requests, args.seed)


if __name__ == "__main__":
    main()
