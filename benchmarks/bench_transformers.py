"""FastChat 0.2.36's model_worker against our transformers engine, same HF folder, one run.

Both run SmolLM2-135M-Instruct as an HF fp32 folder (made once from the bundled GGUF) on the CPU,
each behind its own project's controller and OpenAI API server. FastChat needs old pins
(transformers 4.46.3, pydantic 1.x): it gets its own virtualenv inside the work folder, built by
tests/fastchat_env.py on first use (about a minute) and reused afterwards.

Both stacks are up together and take turns: for 1, 4, 8 and 16 concurrent streaming
`openai`-SDK clients, each of `--rounds` rounds sends one request per client (greedy,
`--max-tokens` each) to one system, then the same requests to the other, the first system
alternating from round to round. A machine whose speed drifts over minutes (other tenants, heat)
thus weighs on both sides alike; measured one system after the other, the same code differed by
15% from run to run. Prints, per number of clients, the median over rounds of total completion
tokens/s for both and its ratio ours / FastChat, and time to first token and latency p50/p95 over
all requests. Completion tokens are counted by re-tokenizing each answer with the model's
tokenizer (FastChat's stream has no usage).

    .venv/bin/python benchmarks/bench_transformers.py [--work .bench/transformers] \
        [--clients 1,4,8,16] [--rounds 3] [--max-tokens 64] [--plot docs/transformers.svg]

`--plot FILE.svg` also draws both systems' median tokens/s against the number of clients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from _plot import line_chart
from _stack import Stack, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a dragon", "a lighthouse", "the sea", "a robot", "a garden", "a city at night",
          "a lost key", "a mountain", "a violin", "a storm", "a fox", "a library",
          "a train", "a desert", "a painter", "a comet"]


@dataclass
class Result:
    ttft: float
    latency: float
    text: str


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def one_request(client: openai.OpenAI, i: int, max_tokens: int) -> Result:
    t0 = time.perf_counter()
    ttft = None
    parts = []
    stream = client.chat.completions.create(
        model="smol", max_tokens=max_tokens, temperature=0, stream=True,
        messages=[{"role": "user", "content": f"Tell me a long story about {TOPICS[i % 16]}."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
    end = time.perf_counter() - t0
    return Result(ttft if ttft is not None else end, end, "".join(parts))


def run_clients(api: str, n: int, first: int, max_tokens: int) -> tuple[list[Result], float]:
    """n clients send one request each at once (prompts `first`, `first + 1`, ...)."""
    client = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=900)
    results: list[Result] = []
    lock = threading.Lock()

    def one(c: int) -> None:
        res = one_request(client, first + c, max_tokens)
        with lock:
            results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def measure(apis: dict[str, str], clients: list[int], rounds: int, max_tokens: int,
            count: object) -> dict[str, dict[int, dict[str, float]]]:
    """Both systems take turns, round by round: the same requests, the first system alternating."""
    for api in apis.values():
        run_clients(api, 1, 0, 8)  # warm-up
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in apis}
    for n in clients:
        rates: dict[str, list[float]] = {name: [] for name in apis}
        done: dict[str, list[Result]] = {name: [] for name in apis}
        for r in range(rounds):
            order = list(apis) if r % 2 == 0 else list(reversed(apis))
            for name in order:
                results, wall = run_clients(apis[name], n, r * n, max_tokens)
                rates[name].append(sum(count(x.text) for x in results) / wall)  # type: ignore[operator]
                done[name] += results
        for name in apis:
            res = done[name]
            out[name][n] = {"tok_s": statistics.median(rates[name]),
                            "ttft50": pct([x.ttft for x in res], 50),
                            "ttft95": pct([x.ttft for x in res], 95),
                            "lat50": pct([x.latency for x in res], 50),
                            "lat95": pct([x.latency for x in res], 95)}
        print(f"  {n:>2} clients: " + ", ".join(
            f"{name} {' '.join(f'{x:.1f}' for x in rates[name])} tok/s" for name in apis),
            flush=True)
    return out


def fastchat_stack(py: Path, folder: Path, work: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    env = dict(os.environ, LOGDIR=str(work), PYTHONUNBUFFERED="1")
    c, w, a = free_port(), free_port(), free_port()
    procs = []

    def start(name: str, argv: list[str]) -> None:
        log = open(work / f"fastchat-{name}.log", "ab")
        procs.append(subprocess.Popen([str(py), "-m", *argv], stdout=log, stderr=subprocess.STDOUT,
                                      cwd=work, env=env, start_new_session=True))

    try:  # what started is stopped if the rest does not come up
        ctrl = f"http://127.0.0.1:{c}"
        start("controller", ["fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(c)])
        wait_for(lambda: httpx.post(ctrl + "/list_models").status_code == 200, 60, "FastChat controller")
        start("worker", ["fastchat.serve.model_worker", "--host", "127.0.0.1", "--port", str(w),
                         "--worker-address", f"http://127.0.0.1:{w}", "--controller-address", ctrl,
                         "--model-path", str(folder), "--model-names", "smol", "--device", "cpu",
                         # FastChat knows no SmolLM2 adapter and would fall back to its `one_shot`
                         # template, which the model answers in a dozen tokens; `qwen-7b-chat` is a
                         # ChatML template, SmolLM2's own format, so both sides write full answers.
                         "--conv-template", "qwen-7b-chat"])
        start("api", ["fastchat.serve.openai_api_server", "--host", "127.0.0.1", "--port", str(a),
                      "--controller-address", ctrl])
        api = f"http://127.0.0.1:{a}"
        wait_for(lambda: "smol" in httpx.get(api + "/v1/models").text, 300, "FastChat's model")
    except BaseException:
        stop(procs)
        raise
    return procs, api


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "transformers")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--plot", help="also write an SVG chart of tok/s by clients to this file")
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LLMRELAY_CACHE"] = str(work)  # FastChat's venv and the HF folder live here
    sys.path.insert(0, str(ROOT / "tests"))
    import fastchat_env
    from transformers import AutoTokenizer

    t = time.monotonic()
    py = fastchat_env.build_fastchat_env()
    folder = fastchat_env.smollm2_hf()
    print(f"FastChat venv {py.parent.parent}, HF folder {folder} ({time.monotonic() - t:.0f} s)")
    tok = AutoTokenizer.from_pretrained(folder)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    print("starting FastChat 0.2.36 (model_worker --device cpu) and llmrelay (transformers "
          "engine)", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    stack = Stack()
    try:
        procs, fastchat_api = fastchat_stack(py, folder, work)
        stack.start_controller()
        stack.start_worker(str(folder), "smol", ("--engine", "transformers", "--device", "cpu",
                                                 "--limit-worker-concurrency", str(max(clients))))
        stack.start_api()
        stack.wait_models(1)
        print("tokens/s of each round:", flush=True)
        measured = measure({"FastChat": fastchat_api, "ours": stack.api}, clients, args.rounds,
                           args.max_tokens, count)
    finally:
        stack.stop()
        stop(procs)
    theirs, ours = measured["FastChat"], measured["ours"]

    print(f"\nSmolLM2-135M-Instruct HF fp32, CPU ({os.cpu_count()} cores), greedy, "
          f"max_tokens {args.max_tokens}, {args.rounds} rounds of one request per client, streaming; "
          "tok/s: median over rounds\n")
    head = ("| clients | FastChat tok/s | ours tok/s | ratio | TTFT p50/p95 FastChat (s) | "
            "TTFT p50/p95 ours (s) | latency p50/p95 FastChat (s) | latency p50/p95 ours (s) |")
    print(head)
    print("|" + "---|" * 8)
    for n in clients:
        f, o = theirs[n], ours[n]
        print(f"| {n} | {f['tok_s']:.1f} | {o['tok_s']:.1f} | {o['tok_s'] / f['tok_s']:.2f}x | "
              f"{f['ttft50']:.2f} / {f['ttft95']:.2f} | {o['ttft50']:.2f} / {o['ttft95']:.2f} | "
              f"{f['lat50']:.2f} / {f['lat95']:.2f} | {o['lat50']:.2f} / {o['lat95']:.2f} |")
    if args.plot:
        line_chart(args.plot, f"SmolLM2-135M-Instruct (HF, fp32) on the CPU, {args.max_tokens} "
                   "tokens per answer", "concurrent streaming clients", "completion tokens/s, total",
                   {"llmrelay, transformers engine": [(n, ours[n]["tok_s"]) for n in clients],
                    "FastChat 0.2.36 model_worker": [(n, theirs[n]["tok_s"]) for n in clients]})
        print(f"\nchart: {args.plot}")


if __name__ == "__main__":
    main()
