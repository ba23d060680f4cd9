"""What runs where: the controller's worker table as rows, for `llmrelay status` and the web page.

`rows()` turns a `GET /worker_table` answer into one row per worker (models, address, queue,
speed, engine, heartbeat age, health, and speculative decoding where a worker uses it);
`format_table()` prints them (the SPECULATIVE column only when some worker speculates). The
API server serves the same rows at `GET /api/workers` for the web page's operator view.
"""

from __future__ import annotations

from typing import Any

import httpx

from llmrelay.ondemand.sizes import fmt_bytes
from llmrelay.ondemand.view import from_table, is_host
from llmrelay.protocol import EXPIRY_BEATS

COLUMNS = [("models", "MODELS"), ("address", "ADDRESS"), ("engine", "ENGINE"),
           ("queue_length", "QUEUE"), ("running", "RUNNING"), ("served", "SERVED"),
           ("speed", "SPEED"), ("heartbeat_age", "LAST BEAT"), ("health", "HEALTH"),
           ("speculative", "SPECULATIVE")]


def health_of(age: float | None, interval: float | None, check: bool, ready: bool) -> str:
    """ok, late (missed a heartbeat), expiring (about to be dropped), not ready, no heartbeat."""
    if not ready:
        return "not ready"
    if not check:
        return "no heartbeat"
    if age is None or not interval:
        return "unknown"
    if age <= interval * 1.5:
        return "ok"
    if age <= interval * (EXPIRY_BEATS - 1):
        return "late"
    return "expiring"


def speculation_of(ours: dict[str, Any]) -> str | None:
    """A speculating worker's mode and acceptance so far, e.g. `ngram 78% (312/400)`; None
    when it does not speculate (llamacpp engine, `--speculative`: docs/speculative.md)."""
    spec = ours.get("speculative")
    if not isinstance(spec, dict) or spec.get("mode") in (None, "off"):
        return None
    proposed, accepted = int(spec.get("proposed") or 0), int(spec.get("accepted") or 0)
    if not proposed:
        return f"{spec['mode']}, no drafts yet"
    return f"{spec['mode']} {accepted / proposed:.0%} ({accepted}/{proposed})"


def rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per worker of a controller's `/worker_table`, sorted by model then address."""
    now = table.get("now")
    interval = table.get("heartbeat_interval")
    out = []
    for w in table.get("workers", []):
        if is_host(w.get("status")):
            continue  # a host of models on demand: see declared_rows
        ours = (w.get("status") or {}).get("llmrelay") or {}
        beat = w.get("last_heart_beat")
        age = round(max(0.0, float(now) - float(beat)), 1) if now and beat else None
        out.append({
            "models": ", ".join(w.get("model_names") or []),
            "address": w.get("name", ""),
            "engine": ours.get("engine", "fastchat" if not ours else "?"),
            "queue_length": int(w.get("queue_length") or 0),
            "running": ours.get("running"),
            "served": ours.get("served"),
            "speed": w.get("speed"),
            "heartbeat_age": age,
            "health": health_of(age, interval, bool(w.get("check_heart_beat", True)),
                                ours.get("ready", True) is not False),
            "speculative": speculation_of(ours),
        })
    out.sort(key=lambda r: (r["models"], r["address"]))
    return out


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "heartbeat_age":
        return f"{value:.1f} s ago"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_table(table_rows: list[dict[str, Any]]) -> str:
    """Plain text columns; an empty table says so."""
    if not table_rows:
        return "no workers registered"
    columns = [(key, title) for key, title in COLUMNS
               if key != "speculative" or any(r.get(key) for r in table_rows)]
    cells = [[title for _, title in columns]]
    cells += [[_cell(r.get(key), key) for key, _ in columns] for r in table_rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def declared_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model declared for loading on demand, with its state on its host."""
    return [{"model": d.name, "state": d.state, "estimate": fmt_bytes(d.bytes) if d.bytes else "-",
             "load": d.load + (", pinned" if d.pin else ""), "host": d.host,
             "error": d.error or "-"} for d in sorted(from_table(table).values(),
                                                      key=lambda d: d.name)]


def format_declared(table_rows: list[dict[str, Any]]) -> str:
    titles = {"model": "MODEL", "state": "STATE", "estimate": "MEMORY (EST.)", "load": "LOAD",
              "host": "HOST", "error": "LAST ERROR"}
    cells = [list(titles.values())] + [[str(r[k]) for k in titles] for r in table_rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(titles))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def fetch_table(controller: str, token: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(controller.rstrip("/") + "/worker_table", headers=headers, timeout=timeout)
    r.raise_for_status()
    return r.json()


def run(args: Any) -> None:
    """`llmrelay status`: print the controller's table; exit 1 with the reason if unreachable.
    (With `--registry` the CLI runs registry/clusterstatus.py instead.)"""
    from llmrelay.security import token_from
    from llmrelay.stackstate import token_path

    url = args.controller_address.split(",")[0].strip()
    try:
        table = fetch_table(url, token_from(args.registration_token, url))
    except httpx.HTTPStatusError as e:
        hint = (" (set --registration-token or LLMRELAY_REGISTRATION_TOKEN; a stack started by "
                f"`llmrelay up` keeps its token in {token_path(url)} while it runs)") \
            if e.response.status_code == 401 else ""
        raise SystemExit(f"error: controller {url} answered {e.response.status_code}{hint}") from e
    except (httpx.HTTPError, ValueError) as e:
        raise SystemExit(f"error: controller {url} not reachable ({type(e).__name__}: {e})") from e
    models = sorted({m for w in table.get("workers", []) for m in w.get("model_names") or []})
    workers = [w for w in table.get("workers", []) if not is_host(w.get("status"))]
    print(f"controller {url}: {len(workers)} workers, "
          f"{len(models)} models ({', '.join(models) or 'none'}), dispatch "
          f"{table.get('dispatch_method', '?')}, heartbeat every {table.get('heartbeat_interval')} s")
    print(format_table(rows(table)))
    declared = declared_rows(table)
    if declared:
        print(f"\nmodels loaded on demand ({len(declared)}):")
        print(format_declared(declared))
