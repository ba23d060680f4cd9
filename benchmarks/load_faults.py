"""Load and faults: N streaming clients for T seconds while workers and the controller are
killed and restarted. Prints requests sent, completed, failed with a clear error, and lost (no
answer, or a stream cut without an error event). Lost must be 0.

Also measures how fast a client's disconnect frees its slot on the worker.

    python benchmarks/load_faults.py --clients 6 --seconds 40

Loopback only; every loop is bounded in time; it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from llmrelay.worker.managed import free_port

PY = [sys.executable, "-m", "llmrelay.cli"]


class Proc:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.p = subprocess.Popen(PY + self.argv, stdout=open(self.log, "ab"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def signal(self, sig: int) -> None:
        if self.p and self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def wait_http(url: str, method: str = "GET", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.request(method, url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "completed": 0, "failed_clear": 0, "lost": 0}
        self.errors: dict[str, int] = {}
        self.lost_why: list[str] = []

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts["sent"] += 1
            self.counts[outcome] += 1
            if outcome == "failed_clear":
                key = detail[:70]
                self.errors[key] = self.errors.get(key, 0) + 1
            elif outcome == "lost":
                self.lost_why.append(detail)


def one_request(api: str, tally: Tally) -> None:
    body = {"model": "smol", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 48, "temperature": 0,
            "stream": True}
    try:
        with httpx.stream("POST", api + "/v1/completions", json=body, timeout=60) as r:
            if r.status_code != 200:
                r.read()
                try:
                    msg = r.json()["error"]["message"]
                except (ValueError, KeyError):
                    tally.add("lost", f"HTTP {r.status_code} without an OpenAI error body")
                    return
                tally.add("failed_clear", f"HTTP {r.status_code}: {msg}")
                return
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as e:
        tally.add("lost", f"{type(e).__name__}: {e}")
        return
    if not events or events[-1] != "[DONE]":
        tally.add("lost", "stream ended without [DONE]")
        return
    last = json.loads(events[-2]) if len(events) > 1 else {}
    if "error" in last:
        tally.add("failed_clear", f"error event: {last['error']['message']}")
    elif last.get("choices") and last["choices"][0].get("finish_reason"):
        tally.add("completed")
    else:
        tally.add("lost", "stream ended without a finish reason or an error")


def cancel_latency(api: str, workers: list[str]) -> float | None:
    """Seconds from a client closing a stream to its worker having nothing running."""
    def running() -> int:
        return sum(httpx.post(w + "/worker_get_status", timeout=2).json()["llmrelay"]["running"]
                   for w in workers)

    body = {"model": "smol", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1500, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", api + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        if running() == 0:
            return None
    t0 = time.monotonic()
    while running() and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--fault-every", type=float, default=4.0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmrelay-faults-"))
    cport, aport, wports = free_port(), free_port(), [free_port(), free_port()]
    controller_url = f"http://127.0.0.1:{cport}"
    env_hb = ["--heartbeat-interval", "1"]
    controller = Proc(["controller", "--port", str(cport), *env_hb], tmp / "controller.log")
    workers = [Proc(["worker", "--port", str(p), "--controller-address", controller_url,
                     "--model-path", "smollm2", "--model-names", "smol", "--n-threads", "1",
                     "--context-length", "2048", "--shutdown-timeout", "5", *env_hb],
                    tmp / f"worker-{p}.log") for p in wports]
    api = Proc(["api", "--port", str(aport), "--controller-address", controller_url,
                "--table-refresh", "0.5", "--request-timeout", "60"], tmp / "api.log")
    api_url = f"http://127.0.0.1:{aport}"
    worker_urls = [f"http://127.0.0.1:{p}" for p in wports]
    procs = [controller, *workers, api]
    try:
        controller.start()
        wait_http(controller_url + "/test_connection")
        for w in workers:
            w.start()
        for u in worker_urls:
            wait_http(u + "/worker_get_status", "POST")
        api.start()
        wait_http(api_url + "/health")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if httpx.get(api_url + "/health").json().get("models"):
                break
            time.sleep(0.2)

        latencies = [x for x in (cancel_latency(api_url, worker_urls) for _ in range(5)) if x]

        tally = Tally()
        stop_at = time.monotonic() + args.seconds

        def client() -> None:
            while time.monotonic() < stop_at:
                one_request(api_url, tally)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for t in threads:
            t.start()
        faults = [
            ("kill -9 worker 1, restart", lambda: (workers[0].signal(signal.SIGKILL),
                                                   workers[0].start())),
            ("kill -9 controller, restart", lambda: (controller.signal(signal.SIGKILL),
                                                     controller.start())),
            ("SIGTERM worker 2, restart", lambda: (workers[1].signal(signal.SIGTERM),
                                                   workers[1].start())),
            ("SIGTERM controller, restart", lambda: (controller.signal(signal.SIGTERM),
                                                     controller.start())),
        ]
        done_faults: list[str] = []
        i = 0
        while time.monotonic() < stop_at - args.fault_every:
            time.sleep(args.fault_every)
            name, action = faults[i % len(faults)]
            action()
            done_faults.append(name)
            i += 1
        for t in threads:
            t.join(timeout=120)
        hung = sum(t.is_alive() for t in threads)
    finally:
        for p in reversed(procs):
            p.signal(signal.SIGTERM)

    c = tally.counts
    print(f"\nllmrelay load and faults: {args.clients} streaming clients, {args.seconds:.0f} s, "
          f"2 SmolLM2 workers, {len(done_faults)} faults ({os.cpu_count()} cores)")
    print(f"faults: {', '.join(done_faults)}")
    print()
    print("| sent | completed | failed with a clear error | lost | clients hung |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {c['sent']} | {c['completed']} | {c['failed_clear']} | {c['lost']} | {hung} |")
    if tally.errors:
        print("\nclear errors seen:")
        for msg, n in sorted(tally.errors.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d}  {msg}")
    if tally.lost_why:
        print("\nLOST:")
        for why in tally.lost_why[:20]:
            print("  ", why)
    if latencies:
        print(f"\nslot freed after a client disconnect: median {statistics.median(latencies)*1000:.0f}"
              f" ms, max {max(latencies)*1000:.0f} ms over {len(latencies)} streams")
    print(f"logs: {tmp}")
    sys.exit(1 if c["lost"] or hung else 0)


if __name__ == "__main__":
    main()
