"""The declared models as the cluster sees them: read from the hosts' entries in a worker table
(a host registers like a worker, with `llmrelay.role = "host"` and its `declared` list).

Plain functions over statuses, used by the API server (which models exist and who loads them),
`llmrelay status` and `llmrelay models`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

STATES = ("loaded", "loading", "downloading", "unloading", "unloaded")
_RANK = {s: i for i, s in enumerate(STATES)}


@dataclass(frozen=True)
class Declared:
    name: str
    host: str  # the host's address
    state: str
    bytes: int = 0
    pin: bool = False
    load: str = "on-demand"
    error: str = ""
    since: float = 0.0  # when the host registered
    address: str = ""  # its worker's, while it has one
    download: dict[str, Any] | None = None  # progress while `downloading` (a hub model)


@dataclass(frozen=True)
class HostMemory:
    """A host's memory budget and what its loaded, loading and unloading models hold of it
    (their estimates, as the host's policy counts them)."""

    host: str  # the host's address
    budget_bytes: int | None  # None: the host could not tell
    held_bytes: int


def is_host(status: Any) -> bool:
    ours = status.get("llmrelay") if isinstance(status, dict) else None
    return isinstance(ours, dict) and ours.get("role") == "host"


def declared_models(entries: Iterable[tuple[str, Any, float]]) -> dict[str, Declared]:
    """Model name -> how it is declared, from (address, status, registered_at) of every table
    entry. A model declared by several hosts: the one where it is furthest along."""
    out: dict[str, Declared] = {}
    for address, status, since in entries:
        if not is_host(status):
            continue
        for d in status["llmrelay"].get("declared") or []:
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                continue
            state = d.get("state") if d.get("state") in _RANK else "unloaded"
            item = Declared(d["name"], address, state, int(d.get("bytes") or 0),
                            bool(d.get("pin")), str(d.get("load") or "on-demand"),
                            str(d.get("error") or ""), float(since or 0),
                            str(d.get("address") or ""),
                            d.get("download") if isinstance(d.get("download"), dict) else None)
            old = out.get(item.name)
            if old is None or _RANK[item.state] < _RANK[old.state]:
                out[item.name] = item
    return out


def host_memory(entries: Iterable[tuple[str, Any]]) -> list[HostMemory]:
    """Each host's budget and held memory, from (address, status) of every table entry."""
    out = []
    for address, status in entries:
        if is_host(status):
            ours = status["llmrelay"]
            budget = ours.get("budget_bytes")
            out.append(HostMemory(address, int(budget) if isinstance(budget, (int, float)) else None,
                                  int(ours.get("held_bytes") or 0)))
    return sorted(out, key=lambda h: h.host)


def from_table(table: dict[str, Any]) -> dict[str, Declared]:
    """Declared models from a `/worker_table` answer."""
    return declared_models((w.get("name", ""), w.get("status") or {}, w.get("registered_at", 0))
                           for w in table.get("workers", []))


def hosts(table: dict[str, Any]) -> list[str]:
    return [w.get("name", "") for w in table.get("workers", []) if is_host(w.get("status"))]
