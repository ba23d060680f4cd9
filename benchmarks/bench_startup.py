"""Start-up: `llmrelay up` from the command to the first chat answer, with the bundled model.

Each run writes a stack file like `llmrelay up`'s default (a controller, one SmolLM2 worker, the
API server) but on free loopback ports, starts `llmrelay up` on it, and polls the API every
20 ms: the time until /health answers, until /v1/models lists the model, and until a chat
completion (8 tokens) comes back. Then it stops the stack (SIGTERM, as Ctrl-C would) and waits
for it to exit. Prints every run and the medians.

    .venv/bin/python benchmarks/bench_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _stack import free_port, load_average, spawn, stop_children


def one_run(work: Path) -> dict[str, float]:
    api_port, ctl_port, worker_port = free_port(), free_port(), free_port()
    stack = work / "stack.toml"
    stack.write_text(
        f'log_dir = "{work / "logs"}"\n[controller]\nport = {ctl_port}\n'
        f'[api]\nport = {api_port}\n[[worker]]\nmodel_path = "smollm2"\n'
        f'model_names = ["smol"]\nport = {worker_port}\n')
    api = f"http://127.0.0.1:{api_port}"
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    marks: dict[str, float] = {}
    llmrelay = str(Path(sys.executable).parent / "llmrelay")
    t0 = time.perf_counter()
    proc = spawn([llmrelay, "up", str(stack)], work / "up.log")
    try:
        with httpx.Client(timeout=5) as c:
            while "answer" not in marks:
                if proc.poll() is not None:
                    raise RuntimeError(f"llmrelay up exited ({proc.returncode}); see {work}/up.log")
                if time.perf_counter() - t0 > 180:
                    raise RuntimeError(f"no answer after 180 s; see {work}/up.log")
                try:
                    if "health" not in marks and c.get(api + "/health").status_code == 200:
                        marks["health"] = time.perf_counter() - t0
                    if "health" in marks and "models" not in marks and "smol" in c.get(
                            api + "/v1/models").text:
                        marks["models"] = time.perf_counter() - t0
                    if "models" in marks:
                        r = c.post(api + "/v1/chat/completions", json=body)
                        if r.status_code == 200 and r.json()["choices"][0]["message"]["content"]:
                            marks["answer"] = time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
    finally:
        t1 = time.perf_counter()
        stop_children([proc], grace=30)
        marks["stop"] = time.perf_counter() - t1
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"before: {load_average()}")
    runs = []
    for i in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="llmrelay-startup-"))
        m = one_run(work)
        runs.append(m)
        print(f"run {i + 1}: /health {m['health']:.2f} s, model listed {m['models']:.2f} s, "
              f"first answer {m['answer']:.2f} s, stopped in {m['stop']:.2f} s", flush=True)
    print(f"\n`llmrelay up` (controller, 1 SmolLM2 worker, API server), {args.runs} runs\n")
    print("| step | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for key, label in (("health", "API /health answers"), ("models", "model listed in /v1/models"),
                       ("answer", "first chat answer"), ("stop", "stop (SIGTERM) to exit")):
        v = [r[key] for r in runs]
        print(f"| {label} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |")
    print(f"\nafter: {load_average()}")


if __name__ == "__main__":
    main()
