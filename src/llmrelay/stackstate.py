"""What `llmrelay up` leaves on disk while it runs: the cluster token and who its children are.

The state folder is `$LLMRELAY_STATE_DIR`, else `$XDG_STATE_HOME/llmrelay`, else
`~/.local/state/llmrelay` (mode 0700). Each running stack has a folder named after its
controller address, `stacks/<host>-<port>/`, holding:

- `token`: the registration token (mode 0600). `llmrelay status`, and a worker or API server
  started by hand against that controller, read it when neither `--registration-token` nor
  LLMRELAY_REGISTRATION_TOKEN is given; Prometheus reads it as `credentials_file`.
- `up.json`: the pid of `up` and of each child with its port, so that a later `up` can tell
  "my own earlier children still hold these ports" from "another program holds this port".
- `admin_key` (mode 0600), when the stack loads models on demand: the key of the host's admin
  endpoints, which `llmrelay models` reads when no `--admin-key` is given.

Both are removed when `up` stops cleanly. After a `kill -9` of `up` they stay behind; a stale
record is recognised (its `up` process is gone) and its token is never used.

Plain Python with no server imports: `llmrelay status` and the launcher both use it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TOKEN_FILE = "token"
ADMIN_KEY_FILE = "admin_key"
RECORD_FILE = "up.json"
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""}


def state_dir() -> Path:
    """The folder where `up` keeps its state (see the module docstring)."""
    if os.environ.get("LLMRELAY_STATE_DIR"):
        return Path(os.environ["LLMRELAY_STATE_DIR"])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "llmrelay"


def stack_key(controller_url: str) -> str:
    """`127.0.0.1-21001` for `http://localhost:21001/`: loopback spellings share one key."""
    url = controller_url.split(",")[0].strip()
    parts = urlsplit(url if "//" in url else "http://" + url)
    host = (parts.hostname or "").lower()
    if host in _LOOPBACK:
        host = "127.0.0.1"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    safe = "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in host)
    return f"{safe}-{port}"


def stack_dir(controller_url: str) -> Path:
    return state_dir() / "stacks" / stack_key(controller_url)


def token_path(controller_url: str) -> Path:
    return stack_dir(controller_url) / TOKEN_FILE


def _private_dir(path: Path) -> None:
    """Make `path` (a stack's folder) and the missing folders above it, each mode 0700."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by the user only, replacing it atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, if `start` is known, is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if sys.platform == "linux":
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if start is not None and process_start(pid) != start:
            return False
    return True


def command_line(pid: int) -> str:
    """The process's command line, or "" when the system does not say."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


@dataclass
class Leftover:
    """A child recorded by an `up` that still runs (`up_alive`: whether that `up` does too)."""

    name: str  # the child: "controller", "worker-smol", "api"
    pid: int
    port: int | None
    up_pid: int
    up_alive: bool
    controller_url: str


class StackState:
    """The state folder of one running stack: written by `up`, read by everyone else."""

    def __init__(self, controller_url: str) -> None:
        self.controller_url = controller_url
        self.dir = stack_dir(controller_url)
        self.token_path = self.dir / TOKEN_FILE
        self.record_path = self.dir / RECORD_FILE
        self.children: dict[str, dict[str, Any]] = {}

    def begin(self, token: str) -> Path:
        """Write the token file and an empty record for this `up`; return the token's path."""
        _private_dir(self.dir)
        _write_private(self.token_path, token + "\n")
        self._save()
        return self.token_path

    def write_admin_key(self, key: str) -> Path:
        """Keep the host's admin key for `llmrelay models` (mode 0600); return its path."""
        _private_dir(self.dir)
        path = self.dir / ADMIN_KEY_FILE
        _write_private(path, key + "\n")
        return path

    def record(self, name: str, pid: int, port: int | None) -> None:
        """Note that child `name` now runs as `pid` on `port` (called at every (re)start)."""
        self.children[name] = {"pid": pid, "start": process_start(pid), "port": port}
        self._save()

    def _save(self) -> None:
        _private_dir(self.dir)
        _write_private(self.record_path, json.dumps({
            "up_pid": os.getpid(), "up_start": process_start(os.getpid()),
            "controller_url": self.controller_url, "children": self.children,
        }, indent=1))

    def clear(self) -> None:
        """Remove the token and the record, if they are still this process's own."""
        data = _read_record(self.record_path)
        if data is not None and data.get("up_pid") not in (None, os.getpid()):
            return  # another `up` has taken over this address since
        for path in (self.token_path, self.record_path, self.dir / ADMIN_KEY_FILE):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_token(controller_url: str) -> str | None:
    """The token of the running stack whose controller is `controller_url`, if `up` runs it.

    A token file left by an `up` that is gone (killed with -9) is not used: it belongs to no
    running cluster, and a controller started by hand at that address has none or another.
    """
    return _read_secret(controller_url, TOKEN_FILE)


def read_admin_key(controller_url: str) -> str | None:
    """The host admin key of the running stack whose controller is `controller_url`."""
    return _read_secret(controller_url, ADMIN_KEY_FILE)


def _read_secret(controller_url: str, name: str) -> str | None:
    d = stack_dir(controller_url)
    data = _read_record(d / RECORD_FILE)
    if data is None or not isinstance(data.get("up_pid"), int):
        return None
    if not alive(data["up_pid"], data.get("up_start")):
        return None
    try:
        path = d / name
        if path.stat().st_uid != os.getuid():
            return None
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def leftovers() -> list[Leftover]:
    """Every recorded `up` or child process that still runs, across all stacks."""
    root = state_dir() / "stacks"
    found: list[Leftover] = []
    try:
        folders = sorted(root.iterdir())
    except OSError:
        return found
    for folder in folders:
        data = _read_record(folder / RECORD_FILE)
        if data is None or not isinstance(data.get("up_pid"), int):
            continue
        up_pid = data["up_pid"]
        if up_pid == os.getpid():
            continue
        up_alive = alive(up_pid, data.get("up_start"))
        url = str(data.get("controller_url", ""))
        children = data.get("children") or {}
        for name, c in children.items():
            if isinstance(c, dict) and isinstance(c.get("pid"), int) \
                    and alive(c["pid"], c.get("start")):
                port = c.get("port") if isinstance(c.get("port"), int) else None
                found.append(Leftover(name, c["pid"], port, up_pid, up_alive, url))
    return found
