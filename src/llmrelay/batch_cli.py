"""`llmrelay batch run requests.jsonl -o results.jsonl --model M`: a JSONL of requests through an
API server's Batch API (the openai SDK: upload, create, wait, download), with a progress bar on
stderr; the results, one line per request in the input's order (`custom_id`, `response` or
`error`), go to the output file. A line is a batch line (`custom_id`, `method`, `url`, `body`)
or just a request body (its custom_id is then `line-N`). Ctrl-C cancels the batch and still
writes what was answered."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

ENDED = ("completed", "failed", "expired", "cancelled")
BAR = 30


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="batch_command", metavar="ACTION", required=True)
    r = sub.add_parser("run", help="run a JSONL of requests as a batch and write the results")
    r.add_argument("input", help="requests, one a line: batch lines or bare request bodies")
    r.add_argument("-o", "--output", default="-", help="results file (default: stdout)")
    r.add_argument("--model", default=None, help="the model of every request (replaces theirs)")
    r.add_argument("--endpoint", default=None, help="/v1/chat/completions (default), "
                   "/v1/completions, /v1/embeddings or /v1/responses; default: the lines' url")
    r.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL",
                                                        "http://127.0.0.1:8000/v1"),
                   help="the API server (default: env OPENAI_BASE_URL, else "
                   "http://127.0.0.1:8000/v1)")
    r.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"),
                   help="the API key (default: env OPENAI_API_KEY)")
    r.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks")


def batch_lines(text: str, model: str | None, endpoint: str | None
                ) -> tuple[list[dict[str, Any]], str]:
    """The input as batch lines, and the endpoint they go to."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise SystemExit("error: the input holds no request")
    if endpoint is None:
        first = rows[0].get("url") if isinstance(rows[0], dict) and "body" in rows[0] else None
        endpoint = first or "/v1/chat/completions"
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise SystemExit(f"error: line {n} is not a JSON object")
        line = dict(row) if "body" in row else {"custom_id": f"line-{n}", "body": row}
        line.setdefault("custom_id", f"line-{n}")
        line["method"], line["url"] = "POST", endpoint
        if model is not None:
            line["body"] = {**line["body"], "model": model}
        out.append(line)
    return out, endpoint


def progress(batch: Any, started: float, out: TextIO = sys.stderr) -> None:
    counts = batch.request_counts
    done, total = (counts.completed + counts.failed, counts.total) if counts else (0, 0)
    filled = BAR * done // total if total else 0
    out.write(f"\r[{'#' * filled}{'.' * (BAR - filled)}] {done}/{total} "
              f"({counts.failed if counts else 0} failed) {batch.status} "
              f"{time.monotonic() - started:.0f} s ")
    out.flush()


def run(args: argparse.Namespace) -> None:
    import openai

    lines, endpoint = batch_lines(Path(args.input).read_text(encoding="utf-8"), args.model,
                                  args.endpoint)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    data = "\n".join(json.dumps(line) for line in lines).encode()
    try:
        f = client.files.create(file=(Path(args.input).name, data), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint=endpoint,  # type: ignore[arg-type]
                                      completion_window="24h")
    except openai.APIError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"batch {batch.id}: {len(lines)} requests to {endpoint}", file=sys.stderr)
    started = time.monotonic()
    try:
        while batch.status not in ENDED:
            progress(batch, started)
            time.sleep(args.poll)
            batch = client.batches.retrieve(batch.id)
    except KeyboardInterrupt:
        print("\ncancelling the batch (what was answered is still written)", file=sys.stderr)
        batch = client.batches.cancel(batch.id)
        while batch.status not in ENDED:
            time.sleep(args.poll)
            batch = client.batches.retrieve(batch.id)
    progress(batch, started)
    print(file=sys.stderr)
    if batch.status == "failed":
        for e in (batch.errors.data if batch.errors and batch.errors.data else []):
            print(f"line {e.line}: {e.message} ({e.code})", file=sys.stderr)
        raise SystemExit(1)
    results: dict[str, str] = {}
    for fid in (batch.output_file_id, batch.error_file_id):
        if fid:
            for row in client.files.content(fid).text.splitlines():
                results[json.loads(row)["custom_id"]] = row
    ordered = [results[line["custom_id"]] for line in lines if line["custom_id"] in results]
    text = "".join(row + "\n" for row in ordered)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"{len(ordered)} results written to {args.output}", file=sys.stderr)
    if batch.status != "completed":
        raise SystemExit(1)
