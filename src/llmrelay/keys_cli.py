"""`llmrelay keys add` (a new named key in a keys file, shown once, stored as its hash) and
`llmrelay usage` (usage per day, key and model, from an API server's `GET /v1/usage`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

USAGE_COLUMNS = [("day", "DAY"), ("key", "KEY"), ("model", "MODEL"), ("requests", "REQUESTS"),
                 ("prompt_tokens", "PROMPT TOKENS"), ("completion_tokens", "COMPLETION TOKENS"),
                 ("total_tokens", "TOTAL TOKENS")]


def add_keys_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    a = sub.add_parser("add", help="make a new key: printed once, its hash written to the file")
    a.add_argument("name", help="the key's name (letters, digits, - and _): what logs, metrics, "
                   "usage and the workers' fair sharing see")
    a.add_argument("--file", default=os.environ.get("LLMRELAY_API_KEYS_FILE", "keys.toml"),
                   help="the keys file (created mode 0600 if missing; default: env "
                   "LLMRELAY_API_KEYS_FILE, else ./keys.toml)")
    a.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models the key may use: names or globs (smol*), space or comma "
                   "separated (default: every model)")
    a.add_argument("--priority", choices=["interactive", "batch"], default="interactive",
                   help="batch: queued after interactive work on busy workers (with aging)")
    a.add_argument("--rpm", type=int, default=None, help="requests per minute")
    a.add_argument("--tpm", type=int, default=None, help="tokens per minute (prompt + completion)")
    a.add_argument("--concurrent", type=int, default=None, help="requests at once")
    a.add_argument("--tpd", type=int, default=None, help="tokens per day")
    a.add_argument("--admin", action="store_true", help="may read usage (GET /v1/usage), the "
                   "metrics (GET /metrics), the workers (GET /api/workers) and /health's details")
    a.add_argument("--metrics-only", action="store_true", help="a scrape credential: may read "
                   "GET /metrics and nothing else (for Prometheus' `authorization`)")


def add_usage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL",
                                                        "http://127.0.0.1:8000/v1"),
                   help="the API server (default: env OPENAI_BASE_URL, else "
                   "http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="an admin key (default: env OPENAI_API_KEY)")
    p.add_argument("--since", default=None, help="first day to show, YYYY-MM-DD (UTC)")
    p.add_argument("--key", default=None, help="only this key (its name)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run_keys(args: argparse.Namespace) -> None:
    from llmrelay.api.keys import KeysFileError, add_key

    models = [m.strip() for item in args.models or [] for m in item.split(",") if m.strip()]
    for flag in ("rpm", "tpm", "concurrent", "tpd"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag} must be at least 1")
    path = Path(args.file)
    try:
        secret = add_key(path, args.name, models=models or None, priority=args.priority,
                         admin=args.admin, metrics_only=args.metrics_only,
                         requests_per_minute=args.rpm,
                         tokens_per_minute=args.tpm, concurrent=args.concurrent,
                         tokens_per_day=args.tpd)
    except (KeysFileError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    print(secret)
    print(f"key '{args.name}' added to {path} (only its hash is stored: copy the key now, it is "
          "not shown again; a running API server reads the file again within a second)",
          file=sys.stderr)


def format_usage(rows: list[dict[str, Any]]) -> str:
    """Plain text columns with a total line; an empty report says so."""
    if not rows:
        return "no usage recorded"
    rows = [dict(r, total_tokens=r["prompt_tokens"] + r["completion_tokens"]) for r in rows]
    total = {"day": "total", "key": "", "model": ""}
    for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
        total[k] = sum(r[k] for r in rows)
    cells = [[title for _, title in USAGE_COLUMNS]]
    cells += [[str(r[k]) for k, _ in USAGE_COLUMNS] for r in [*rows, total]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(USAGE_COLUMNS))]
    numeric = [k not in ("day", "key", "model") for k, _ in USAGE_COLUMNS]
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()
                     for row in cells)


def run_usage(args: argparse.Namespace) -> None:
    import json

    import httpx

    url = args.base_url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    query = {k: v for k, v in (("since", args.since), ("key", args.key)) if v}
    try:
        r = httpx.get(url + "/usage", params=query, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise SystemExit(f"error: {url} not reachable ({type(e).__name__}: {e})") from e
    if r.status_code != 200:
        try:
            why = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = r.text[:300]
        raise SystemExit(f"error: {url}/usage answered {r.status_code}: {why}")
    rows = r.json()["data"]
    print(json.dumps(rows, indent=2) if args.json else format_usage(rows))
