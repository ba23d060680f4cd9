"""Can a server listen on this port, and if not, who holds it.

`bind_error()` binds the way uvicorn does (asyncio's `create_server`: every address the host
resolves to, `SO_REUSEADDR`, `IPV6_V6ONLY` on IPv6), so it agrees with what the servers can
really do: TIME_WAIT connections left by a server that just stopped do not count, a listener
does. `listeners()` names the processes listening on a port from /proc/net/tcp{,6} and
/proc/<pid>/fd (Linux), else from `lsof` when installed; without either (or without the right to
look at another user's processes) it says nothing rather than guess. `port_taken()` says all of
it to the user of `llmrelay up`, naming an earlier stack's leftovers (llmrelay.stackstate).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from pathlib import Path

from llmrelay.stackstate import leftovers


def bind_error(host: str, port: int) -> OSError | None:
    """None when a server could listen on host:port now, else the error binding it gives."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {e}")
    bound = 0
    for family, kind, proto, _, addr in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:  # asyncio skips a family that is not enabled
                    continue
                return e
            bound += 1
    return None if bound else OSError(errno.EADDRNOTAVAIL, f"no usable address for {host!r}")


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    return inodes


def _proc_listeners(port: int) -> list[int] | None:
    if not Path("/proc/net/tcp").exists():
        return None
    wanted = {f"socket:[{i}]" for i in _listening_inodes(port)}
    pids: list[int] = []
    if not wanted:
        return pids
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(entry / "fd" / fd) in wanted:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return sorted(pids)


def _lsof_listeners(port: int) -> list[int]:
    lsof = shutil.which("lsof")
    if lsof is None:
        return []
    try:
        out = subprocess.run([lsof, "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-t"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({int(tok) for tok in out.split() if tok.isdigit()})


def listeners(port: int) -> list[int]:
    """Pids of the processes listening on `port` that this user may see; [] when unknown."""
    pids = _proc_listeners(port)
    return pids if pids is not None else _lsof_listeners(port)


def describe(pid: int) -> str:
    """`pid 1234 (python -m http.server 8000)`, the command cut to a readable length."""
    from llmrelay.stackstate import command_line

    cmd = command_line(pid)
    if not cmd:
        try:
            cmd = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                                 text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            cmd = ""
    if len(cmd) > 100:
        cmd = cmd[:97] + "..."
    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"


def port_taken(name: str, host: str, port: int, err: OSError) -> str:
    """Why `name` cannot listen on host:port, and what to do about it."""
    where = f"{name}: cannot listen on {host}:{port} ({err.strerror or err})"
    if err.errno != errno.EADDRINUSE:
        return f"{where}: choose another host or port"
    holders = listeners(port)
    # a recorded process of ours that is alive: the listener itself where the system names it,
    # else the one recorded on that port
    ours = [x for x in leftovers() if (x.pid in holders if holders else x.port == port)]
    if ours:
        first = ours[0]
        if first.up_alive:
            return (f"{where}: an `llmrelay up` (pid {first.up_pid}) runs a stack there "
                    f"(controller {first.controller_url}); stop it with Ctrl-C where it runs, or "
                    f"`kill {first.up_pid}`")
        pids = sorted({x.pid for x in leftovers() if x.up_pid == first.up_pid})
        return (f"{where}: {describe(first.pid)}, the {first.name} of an earlier `llmrelay up` "
                f"(pid {first.up_pid}, no longer running), still holds it. Stop what is left of "
                f"that stack with `kill {' '.join(map(str, pids))}` (`kill -9` if they do not "
                "stop), then start again")
    if holders:
        return (f"{where}: {', '.join(describe(p) for p in holders)} holds that port: stop it "
                "or choose another port")
    return (f"{where}: another program holds that port (this system does not say which; "
            f"`ss -ltnp 'sport = :{port}'` or `lsof -iTCP:{port} -sTCP:LISTEN`, as root for "
            "another user's process, can): stop it or choose another port")
