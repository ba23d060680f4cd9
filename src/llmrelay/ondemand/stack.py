"""Models on demand in a stack file, for `llmrelay up`: which `[[worker]]` tables the host
manages (`load = "on-demand"` or `"manual"`, or `pin = true`), the `[host]` section (the flags
of `llmrelay host`), `--models-dir`, and the host's command line.

Plain data in and out (the launcher builds its child from it), so the launcher gains a few
lines only.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrelay.ondemand.catalog import (
    CatalogError,
    check_unique,
    dumps_specs,
    is_managed,
    parse_flags,
    scan_models_dir,
    spec_from_entry,
    to_argv,
)
from llmrelay.ondemand.main import ADMIN_KEY_ENV, DEFAULT_PORT, add_host_args


@dataclass
class HostPlan:
    """The host child of a stack."""

    argv: list[str]
    host: str
    port: int
    url: str
    env: dict[str, str] = field(default_factory=dict)
    admin_key: str = ""
    models: list[str] = field(default_factory=list)


def split(workers: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(always-loaded workers, models for the host)."""
    always = [w for w in workers if not is_managed(w)]
    for w in always:
        w.pop("load", None)
        w.pop("pin", None)
    return always, [w for w in workers if is_managed(w)]


def plan(managed: list[dict[str, Any]], section: dict[str, Any], models_dir: str | None,
         base: Path, controller_url: str, heartbeat: float, log_dir: Path, used_ports: set[int],
         threads: int) -> HostPlan | None:
    """The host's command, or None when the stack loads nothing on demand. Raises ValueError
    (CatalogError) naming the model or key at fault."""
    if not managed and not models_dir:
        if section:
            raise CatalogError("[host]: the stack has no model loaded on demand (load = "
                               "\"on-demand\" in a [[worker]], or --models-dir)")
        return None
    specs = []
    for i, w in enumerate(managed):
        w = dict(w)
        w.setdefault("n_threads", threads)
        specs.append(spec_from_entry(w, f"[[worker]] {w.get('model_names') or w.get('model_path')}"
                                     f" (on demand, #{i + 1})"))
    if models_dir:
        folder = Path(models_dir).expanduser()
        specs += scan_models_dir(folder if folder.is_absolute() else Path.cwd() / folder,
                                 {"n_threads": threads})
    if not specs:
        raise CatalogError(f"--models-dir {models_dir}: no .gguf file or HF folder in it")
    check_unique(specs)
    section = dict(section)
    admin_key = str(section.pop("admin_key", "") or os.environ.get(ADMIN_KEY_ENV, "")) \
        or secrets.token_urlsafe(24)
    section.setdefault("controller_address", controller_url)
    section.setdefault("heartbeat_interval", heartbeat)
    if "port" not in section:
        port = DEFAULT_PORT
        while port in used_ports:
            port += 1
        section["port"] = port
    section.setdefault("worker_log_dir", str(log_dir))
    flags = to_argv(section, "[host]")
    args = parse_flags(add_host_args, flags, "[host]")
    if args.models_dir or args.catalog:
        raise CatalogError("[host]: declare models with [[worker]] tables (load = \"on-demand\") "
                           "or `llmrelay up --models-dir`")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    argv = [sys.executable, "-m", "llmrelay.cli", "host", *flags, "--models-json",
            dumps_specs(specs)]
    return HostPlan(argv, args.host, args.port, f"http://{host}:{args.port}",
                    {ADMIN_KEY_ENV: admin_key}, admin_key, [s.name for s in specs])
