"""The Batch API against interactive traffic, and against clients sending the same requests.

One controller, one SmolLM2 worker (`--n-threads`, default concurrency 5), one API server
without keys (the interactive requests have no key; a batch's lines carry priority `batch`).

1. Interactive TTFT: `--interactive` streamed chat requests sent one after another
   (`--max-tokens` each), on the idle stack, then again while a batch of `--lines` lines is
   running (cancelled afterwards). Target: p95 with the batch <= 1.5x the idle p95.
2. Throughput: `--throughput-lines` requests as one batch on the otherwise idle stack (from
   create to completed, polled every 0.1 s), then the same requests sent by `--clients`
   concurrent clients (non-streamed). Completion tokens per second of each. Target: the batch
   >= 0.9x the clients.

    .venv/bin/python benchmarks/bench_batch_api.py [--lines 500] [--interactive 20]
        [--max-tokens 8] [--throughput-lines 150] [--clients 8] [--n-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import time
from typing import Any

import openai
from _stack import Stack, load_average


def body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": "smol", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write about the number {i}."}]}


def submit(client: openai.OpenAI, n: int, max_tokens: int) -> Any:
    text = "\n".join(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body(i, max_tokens)})
                     for i in range(n))
    f = client.files.create(file=("in.jsonl", io.BytesIO(text.encode())), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def ttfts(client: openai.OpenAI, n: int, max_tokens: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        stream = client.chat.completions.create(**body(1000 + i, max_tokens), stream=True)
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        out.append(first if first is not None else time.perf_counter() - start)
    return out


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


async def clients(api: str, n: int, max_tokens: int, concurrency: int) -> tuple[int, float]:
    client = openai.AsyncOpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=600)
    todo = list(range(n))
    tokens = 0

    async def one_client() -> None:
        nonlocal tokens
        while todo:
            i = todo.pop(0)
            r = await client.chat.completions.create(**body(i, max_tokens))
            tokens += r.usage.completion_tokens if r.usage else 0

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return tokens, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=500)
    p.add_argument("--interactive", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--throughput-lines", type=int, default=150)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--n-threads", type=int, default=1)
    args = p.parse_args()
    stack = Stack()
    try:
        stack.start_controller()
        stack.start_worker(extra=("--n-threads", str(args.n_threads)))
        api = stack.start_api()
        stack.wait_models(1)
        c = openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0, timeout=600)
        ttfts(c, 3, args.max_tokens)  # warm up

        idle = ttfts(c, args.interactive, args.max_tokens)
        b = submit(c, args.lines, args.max_tokens)
        while c.batches.retrieve(b.id).request_counts.completed < 10:  # running at full width
            time.sleep(0.1)
        busy = ttfts(c, args.interactive, args.max_tokens)
        during = c.batches.retrieve(b.id)
        c.batches.cancel(b.id)
        while c.batches.retrieve(b.id).status != "cancelled":
            time.sleep(0.2)
        print(f"interactive TTFT ({args.interactive} requests, {args.max_tokens} tokens): idle "
              f"p50 {statistics.median(idle) * 1000:.0f} ms p95 {p95(idle) * 1000:.0f} ms; with "
              f"a {args.lines}-line batch running p50 {statistics.median(busy) * 1000:.0f} ms "
              f"p95 {p95(busy) * 1000:.0f} ms: {p95(busy) / p95(idle):.2f}x (target <= 1.5x); "
              f"the batch answered {during.request_counts.completed} lines meanwhile")

        start = time.perf_counter()
        b = submit(c, args.throughput_lines, args.max_tokens)
        while (b := c.batches.retrieve(b.id)).status not in ("completed", "failed"):
            time.sleep(0.1)
        batch_s = time.perf_counter() - start
        batch_tps = b.usage.output_tokens / batch_s
        tokens, client_s = asyncio.run(clients(api, args.throughput_lines, args.max_tokens,
                                               args.clients))
        client_tps = tokens / client_s
        print(f"throughput ({args.throughput_lines} requests, {args.max_tokens} tokens): batch "
              f"{b.usage.output_tokens} tokens in {batch_s:.1f} s = {batch_tps:.1f} tokens/s; "
              f"{args.clients} clients {tokens} tokens in {client_s:.1f} s = {client_tps:.1f} "
              f"tokens/s: {batch_tps / client_tps:.2f}x (target >= 0.9x)")
        print(load_average())
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
