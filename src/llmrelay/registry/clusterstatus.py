"""`llmrelay status --registry URLS`: the cluster as the NATS registry sees it.

Each NATS server given is asked on a connection of its own (reachable? its name, version,
round trip); the bucket's stream says which servers hold its replicas, which one leads and
whether the others are current; then one read of the bucket lists the controllers and API
servers (their presence records) and the workers (as `llmrelay status` shows them).
`gather()` returns it all as data, `format_status()` as text.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from llmrelay.registry.base import RegistryConfig, RegistryError
from llmrelay.registry.natskv import connect, decode, describe_error
from llmrelay.registry.records import APIS, CONTROLLERS, RecordView
from llmrelay.status import format_table, rows


async def _node(cfg: RegistryConfig, url: str) -> dict[str, Any]:
    one = replace(cfg, servers=[url])
    row: dict[str, Any] = {"url": one.describe(), "server": None, "version": None,
                           "rtt_ms": None, "status": "not reachable"}
    try:
        nc = await asyncio.wait_for(connect(one, "llmrelay status"), 5)
    except (RegistryError, asyncio.TimeoutError) as e:
        row["status"] = ("credentials refused" if "credentials" in str(e) else
                         "not reachable" if str(e) else "not reachable (timeout)")
        return row
    try:
        info = getattr(nc, "_server_info", {}) or {}
        row.update(server=info.get("server_name"), version=info.get("version"),
                   status="ok" if info.get("jetstream") else "ok, but JetStream is off")
        row["rtt_ms"] = round(await nc.rtt() * 1000, 2)
    except Exception:
        pass
    finally:
        await nc.close()
    return row


async def gather(cfg: RegistryConfig) -> dict[str, Any]:
    """Nodes, the bucket's replicas, and the records (see the module docstring)."""
    from nats.js.errors import BucketNotFoundError

    nodes = list(await asyncio.gather(*(_node(cfg, u) for u in cfg.servers)))
    out: dict[str, Any] = {"registry": cfg.describe(), "bucket": cfg.bucket, "nodes": nodes,
                           "replicas": [], "leader": None, "view": None, "error": None}
    try:
        nc = await asyncio.wait_for(connect(cfg, "llmrelay status"), 10)
    except (RegistryError, asyncio.TimeoutError) as e:
        out["error"] = str(e) or describe_error(cfg, e)
        return out
    try:
        js = nc.jetstream(timeout=3)
        try:
            kv = await js.key_value(cfg.bucket)
        except BucketNotFoundError:
            out["error"] = f"no bucket {cfg.bucket!r} yet (no process has used this registry)"
            return out
        si = await js.stream_info(f"KV_{cfg.bucket}")
        cluster = si.cluster
        out["configured_replicas"] = si.config.num_replicas
        if cluster is not None:
            out["leader"] = cluster.leader
            out["replicas"] = [{"server": cluster.leader, "role": "leader", "current": True}] + [
                {"server": p.name, "role": "replica", "current": bool(p.current),
                 "offline": bool(p.offline), "lag": p.lag or 0,
                 "active_s": round((p.active or 0) / 1e9, 1)}
                for p in cluster.replicas or []]
        view = RecordView()
        watcher = await kv.watchall()
        first: dict[str, Any] = {}
        while True:
            entry = await watcher.updates(timeout=5)
            if entry is None:
                break
            if entry.operation is None:
                first[entry.key] = decode(entry.value)
            else:
                first.pop(entry.key, None)
        await watcher.stop()
        view.replace(first)
        out["view"] = view
    except Exception as e:
        out["error"] = f"the bucket could not be read ({type(e).__name__}: {e})"
    finally:
        await nc.close()
    return out


def _ago(seconds: float) -> str:
    return f"{seconds:.1f} s ago"


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def format_status(st: dict[str, Any]) -> str:
    roles = {r["server"]: r for r in st["replicas"]}
    lines = [f"NATS registry {st['registry']}, bucket {st['bucket']!r}"
             + (f" (R{st.get('configured_replicas')}, leader {st['leader']})"
                if st.get("leader") else "")]
    table = [["NODE", "SERVER", "VERSION", "RTT", "HEALTH"]]
    for n in st["nodes"]:
        health = n["status"]
        r = roles.get(n["server"])
        if r is not None:
            health += ", bucket leader" if r["role"] == "leader" else (
                ", replica current" if r["current"] else
                f", replica behind (lag {r.get('lag', 0)})")
        table.append([n["url"], n["server"] or "-", n["version"] or "-",
                      f"{n['rtt_ms']} ms" if n["rtt_ms"] is not None else "-", health])
    named = {n["server"] for n in st["nodes"]}
    for r in st["replicas"]:
        if r["server"] not in named:
            state = "offline" if r.get("offline") else (
                "current" if r["current"] else f"behind (lag {r.get('lag', 0)})")
            table.append(["(not in --registry)", r["server"] or "-", "-", "-",
                          f"bucket {r['role']}, {state}"])
    lines.append(_columns(table))
    if st["error"]:
        lines.append(f"error: {st['error']}")
        return "\n".join(lines)
    view: RecordView = st["view"]
    for kind, title in ((CONTROLLERS, "controllers"), (APIS, "API servers")):
        found = view.of_kind(kind)
        lines.append(f"\n{title}: {len(found)}")
        if found:
            rows_ = [["ADDRESS", "HOST", "PID", "VERSION", "UP SINCE", "LAST SEEN"]]
            for address, r, _age in found:
                up = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r.get("started")
                                                                              or 0)))
                seen = max(0.0, time.time() - float(r.get("sent_at") or 0))
                rows_.append([address, str(r.get("host", "-")), str(r.get("pid", "-")),
                              str(r.get("version", "-")), up, _ago(seen)])
            lines.append(_columns(rows_))
    workers = view.table()
    lines.append(f"\nworkers: {len(workers['workers'])}")
    lines.append(format_table(rows(workers)))
    return "\n".join(lines)


def run(args: Any) -> None:
    """Print the cluster's status; exit 1 when the registry cannot be read."""
    try:
        cfg = RegistryConfig.from_args(args)
    except RegistryError as e:
        raise SystemExit(f"error: {e}") from e
    assert cfg is not None
    st = asyncio.run(gather(cfg))
    print(format_status(st))
    if st["error"]:
        raise SystemExit(1)
