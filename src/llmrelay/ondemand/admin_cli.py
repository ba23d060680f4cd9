"""`llmrelay models list|load|unload|pin|unpin`: a host's admin endpoints from the command line; `list`
also shows what the Hugging Face cache holds (models fetched by name, `llmrelay pull`), and
works without any host for that.

The host is found in the controller's table (the one that declares the model), or given with
`--host-address`. The admin key comes from `--admin-key`, else LLMRELAY_ADMIN_KEY, else the
state folder of the `llmrelay up` stack whose controller is `--controller-address`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

from llmrelay.ondemand.sizes import fmt_bytes

ADMIN_KEY_ENV = "LLMRELAY_ADMIN_KEY"


class NoHost(Exception):
    """No host to ask; the message says why."""


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (("list", "every declared model: state (downloading: how far), memory, "
                         "idle time, loads; and the models in the Hugging Face cache"),
                       ("load", "load a model now (and wait until it is loaded)"),
                       ("unload", "unload a model (its running requests finish first)"),
                       ("pin", "keep a model loaded (loaded now if it is not; never evicted) "
                        "until unpinned or the host restarts"),
                       ("unpin", "let a pinned model be evicted or unloaded when idle again")):
        q = sub.add_parser(name, help=text)
        if name != "list":
            q.add_argument("model", help="the model's name")
        if name == "load":
            q.add_argument("--no-wait", action="store_true", help="return once the load is queued")
        q.add_argument("--controller-address", default="http://127.0.0.1:21001",
                       help="where to find the hosts (the first of a comma-separated list)")
        q.add_argument("--host-address", default=None, help="talk to this host directly")
        q.add_argument("--admin-key", default=None,
                       help=f"the hosts' admin key (default: env {ADMIN_KEY_ENV}, else the "
                       "running `llmrelay up` stack's)")
        q.add_argument("--registration-token", default=None,
                       help="the cluster's token, to read the controller's table")


def _hosts(args: argparse.Namespace, model: str | None) -> list[str]:
    if args.host_address:
        return [args.host_address.rstrip("/")]
    from llmrelay.ondemand.view import from_table, hosts
    from llmrelay.security import token_from
    from llmrelay.status import fetch_table

    url = args.controller_address.split(",")[0].strip()
    try:
        table = fetch_table(url, token_from(args.registration_token, url))
    except (httpx.HTTPError, ValueError) as e:
        raise NoHost(f"cannot read the controller's table at {url} ({e}); give "
                     "--host-address, or --registration-token") from None
    if model is None:
        found = hosts(table)
        if not found:
            raise NoHost(f"no host of models on demand is registered with {url}")
        return found
    d = from_table(table).get(model)
    if d is None:
        names = ", ".join(sorted(from_table(table))) or "none"
        sys.exit(f"error: no host declares a model named {model!r} (declared: {names})")
    return [d.host]


def _key(args: argparse.Namespace) -> str:
    key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not key:
        from llmrelay.stackstate import read_admin_key

        key = read_admin_key(args.controller_address.split(",")[0].strip())
    if not key:
        sys.exit(f"error: no admin key: give --admin-key or set {ADMIN_KEY_ENV} (a stack "
                 "started by `llmrelay up` keeps its key in its state folder while it runs)")
    return key


def _call(method: str, url: str, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"},
                          timeout=httpx.Timeout(10.0, read=None))
    except httpx.HTTPError as e:
        sys.exit(f"error: {url} not reachable ({type(e).__name__}: {e})")
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code != 200:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        sys.exit(f"error: {message or f'{url} answered {r.status_code}'}")
    return data if isinstance(data, dict) else {}


COLUMNS = [("name", "MODEL"), ("state", "STATE"), ("load", "LOAD"), ("pin", "PINNED"),
           ("estimate_bytes", "ESTIMATE"), ("memory_bytes", "IN USE"), ("idle_s", "IDLE"),
           ("idle_unload", "IDLE UNLOAD"), ("loads", "LOADS"), ("evictions", "EVICTIONS"),
           ("error", "LAST ERROR")]


def _cell(key: str, value: Any, model: dict[str, Any] | None = None) -> str:
    if key == "state" and value == "downloading" and isinstance((model or {}).get("download"),
                                                                dict):
        d = model["download"]  # type: ignore[index]
        return (f"downloading {float(d.get('percent') or 0):.0f}% "
                f"({fmt_bytes(d.get('done_bytes'))} of {fmt_bytes(d.get('total_bytes'))})")
    if value is None:
        return "-"
    if key in ("estimate_bytes", "memory_bytes"):
        return fmt_bytes(value)
    if key == "pin":
        return "yes" if value else "no"
    if key == "idle_s":
        return f"{value:.0f} s"
    return str(value)


def format_listing(data: dict[str, Any]) -> str:
    lines = [f"host {data.get('host')}: budget {data.get('budget')}, "
             f"{fmt_bytes(data.get('held_bytes'))} held, {fmt_bytes(data.get('free_bytes'))} free"
             + (f", queue: {', '.join(data['queue'])}" if data.get("queue") else "")]
    cells = [[title for _, title in COLUMNS]]
    cells += [[_cell(k, m.get(k), m) for k, _ in COLUMNS] for m in data.get("models", [])]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def format_cache() -> str:
    """The models in the Hugging Face cache (whole files; a download under way is not counted)."""
    from llmrelay.worker import hub

    found = hub.list_cache()
    lines = [f"Hugging Face cache {hub.cache_dir()}: "
             + (f"{len(found)} models" if found else "no models")]
    cells = [["MODEL", "REVISIONS", "SIZE", "FILES"]]
    cells += [[c.repo, ", ".join(c.revisions) or "-", fmt_bytes(c.size),
               ", ".join(c.files[:6]) + (" ..." if len(c.files) > 6 else "")] for c in found]
    if found:
        widths = [max(len(row[i]) for row in cells) for i in range(4)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  for row in cells]
    return "\n".join(lines)


def format_downloads(table: dict[str, Any]) -> str:
    """Workers still fetching their model from the hub (worker/download.py), one line each."""
    lines = []
    for w in table.get("workers", []):
        d = ((w.get("status") or {}).get("llmrelay") or {}).get("downloading")
        if isinstance(d, dict):
            lines.append(f"{', '.join(map(str, d.get('models') or []))}  " + _cell(
                "state", "downloading", {"download": d}) + f"  worker {w.get('name')}")
    return "\n".join(["workers fetching their model:", *lines]) if lines else ""


def _list(args: argparse.Namespace) -> None:
    if not args.host_address:
        from llmrelay.security import token_from
        from llmrelay.status import fetch_table

        url = args.controller_address.split(",")[0].strip()
        try:
            text = format_downloads(fetch_table(url, token_from(args.registration_token, url)))
        except (httpx.HTTPError, ValueError, AttributeError):
            text = ""
        if text:
            print(text + "\n")
    try:
        hosts = _hosts(args, None)
    except NoHost as e:
        print(f"(no models on demand: {e})")
    else:
        key = _key(args)
        for host in hosts:
            print(format_listing(_call("GET", host + "/admin/models", key)) + "\n")
    print(format_cache())


def run(args: argparse.Namespace) -> None:
    if not getattr(args, "action", None):
        sys.exit("usage: llmrelay models {list,load,unload,pin,unpin} ...")
    model = getattr(args, "model", None)
    if args.action == "list":
        _list(args)
        return
    try:
        hosts = _hosts(args, model)
    except NoHost as e:
        sys.exit(f"error: {e}")
    key = _key(args)
    if args.action == "load":
        data = _call("POST", hosts[0] + "/admin/load", key,
                     {"model": model, "wait": not args.no_wait})
        print(f"{model}: {data.get('state')}" + (f" at {data['address']}"
                                                 if data.get("address") else ""))
        return
    data = _call("POST", f"{hosts[0]}/admin/{args.action}", key, {"model": model})
    pinned = {"pin": ", pinned", "unpin": ", not pinned"}.get(args.action, "")
    print(f"{model}: {data.get('state')}{pinned}")
