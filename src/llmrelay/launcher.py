"""`llmrelay up [stack.toml]`: the whole stack as child processes, from one command.

Starts the controller, then the workers (in parallel), then the API server; waits until each is
really ready (controller answers, worker registered, API lists every model) instead of sleeping;
prefixes each child's log lines and keeps them in `log_dir`; restarts a child that crashes; and
stops everything on Ctrl-C or SIGTERM. The stack file's keys are the commands' own flags (with
`_` or `-`), checked by the same parsers, so the file cannot drift from the commands.
See docs/stack-file.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from llmrelay.config import add_api_args, add_controller_args, add_worker_args
from llmrelay.security import TOKEN_ENV, auth_headers

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class StackError(Exception):
    """The stack file or the machine cannot run this stack; the message says why."""


DEFAULT_STACK: dict[str, Any] = {
    "controller": {},
    "api": {},
    "worker": [{"model_path": "smollm2"}],
}


def _argv(section: dict[str, Any], where: str) -> list[str]:
    argv: list[str] = []
    for key, value in section.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, (str, int, float)):
            argv += [flag, str(value)]
        else:
            raise StackError(f"{where}: {key} must be a string, number, boolean or list")
    return argv


def _parse(add: Any, argv: list[str], where: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=where, add_help=False, exit_on_error=False,
                                     allow_abbrev=False)
    add(parser)
    try:
        args, unknown = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise StackError(f"{where}: {e}") from e
    if unknown:
        raise StackError(f"{where}: unknown setting {unknown[0].lstrip('-').replace('-', '_')!r}")
    return args


@dataclass
class Child:
    name: str
    argv: list[str]
    url: str
    log_path: Path
    proc: subprocess.Popen[str] | None = None
    restarts: int = 0
    started_at: float = 0.0
    stopping: bool = False
    tail: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # secrets travel here, never in argv


@dataclass
class Stack:
    controller: Child
    workers: list[Child]
    api: Child
    controller_url: str
    api_url: str
    worker_urls: list[str]
    token: str | None = None


def load_stack(path: str | None, log_dir: str | None) -> tuple[Stack, Path]:
    """Read and check a stack file (or the default stack) into the commands to run."""
    if path is None:
        data = DEFAULT_STACK
        base = Path.cwd()
    else:
        p = Path(path)
        if not p.is_file():
            raise StackError(f"stack file {path} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise StackError(f"{path} is not valid TOML: {e}") from e
        base = p.parent
    unknown = set(data) - {"controller", "api", "worker", "workers", "log_dir",
                           "registration_token"}
    if unknown:
        raise StackError(f"unknown section {sorted(unknown)[0]!r}; expected [controller], [api], "
                         "[[worker]] and log_dir")
    logs = Path(log_dir or data.get("log_dir") or base / "logs")
    workers = data.get("worker", data.get("workers", []))
    if isinstance(workers, dict):
        workers = [workers]
    if not workers:
        raise StackError("the stack has no [[worker]]")

    # The cluster secret: from the file or the environment, else a fresh one for this run.
    token = data.get("registration_token", os.environ.get(TOKEN_ENV)) or secrets.token_urlsafe(24)
    if not isinstance(token, str):
        raise StackError("registration_token must be a string")
    secret_env = {TOKEN_ENV: token}
    c_argv = _argv(dict(data.get("controller", {})), "[controller]")
    c_args = _parse(add_controller_args, c_argv, "[controller]")
    controller_url = f"http://{_client_host(c_args.host)}:{c_args.port}"
    py = [sys.executable, "-m", "llmrelay.cli"]
    controller = Child("controller", py + ["controller"] + c_argv, controller_url,
                       logs / "controller.log", env=secret_env)

    children: list[Child] = []
    used_ports = {c_args.port}
    names: set[str] = set()
    next_port = 21002
    for i, w in enumerate(workers):
        where = f"[[worker]] #{i + 1}"
        w = dict(w)
        if "port" not in w:
            while next_port in used_ports:
                next_port += 1
            w["port"] = next_port
        w.setdefault("controller_address", controller_url)
        w.setdefault("heartbeat_interval", c_args.heartbeat_interval)
        # Share the cores: llama.cpp threads spin while waiting, so workers that together ask
        # for more threads than there are cores slow each other down many times over.
        w.setdefault("n_threads", max(1, (os.cpu_count() or 1) // len(workers)))
        w_argv = _argv(w, where)
        w_args = _parse(add_worker_args, w_argv, where)
        if w_args.port in used_ports:
            raise StackError(f"{where}: port {w_args.port} is used twice in the stack")
        used_ports.add(w_args.port)
        label = (w_args.model_names or w_args.model_path).split(",")[0].strip()
        label = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)
        name = f"worker-{label}"
        while name in names:
            name += "-2"
        names.add(name)
        url = w_args.worker_address or f"http://{_client_host(w_args.host)}:{w_args.port}"
        children.append(Child(name, py + ["worker"] + w_argv, url, logs / f"{name}.log",
                              env=secret_env))

    a = dict(data.get("api", {}))
    a.setdefault("controller_address", controller_url)
    keys = a.pop("api_keys", None)
    api_env = dict(secret_env)
    if keys:
        api_env["LLMRELAY_API_KEYS"] = ",".join(keys) if isinstance(keys, list) else str(keys)
    a_argv = _argv(a, "[api]")
    a_args = _parse(add_api_args, a_argv, "[api]")
    if a_args.port in used_ports:
        raise StackError(f"[api]: port {a_args.port} is already used by another process of the stack")
    api_url = f"http://{_client_host(a_args.host)}:{a_args.port}"
    api = Child("api", py + ["api"] + a_argv, api_url, logs / "api.log", env=api_env)
    stack = Stack(controller, children, api, controller_url, api_url, [c.url for c in children],
                  token)
    for child, host, port in [(controller, c_args.host, c_args.port), (api, a_args.host, a_args.port)]:
        _check_port(child.name, host, port)
    for child in children:
        port = int(child.url.rsplit(":", 1)[1])
        _check_port(child.name, "127.0.0.1", port)
    return stack, logs


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _check_port(name: str, host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host if host not in ("", "::") else "0.0.0.0", port))
        except OSError as e:
            raise StackError(f"{name}: cannot listen on {host}:{port} ({e.strerror}); another "
                             "program holds that port: stop it or choose another port") from e


class Launcher:
    def __init__(self, stack: Stack, log_dir: Path, out: TextIO = sys.stdout) -> None:
        self.stack = stack
        self.log_dir = log_dir
        self.out = out
        self.lock = threading.Lock()
        self.stopping = False

    def say(self, msg: str) -> None:
        with self.lock:
            self.out.write(msg + "\n")
            self.out.flush()

    def start(self, child: Child) -> None:
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **child.env)
        child.proc = subprocess.Popen(
            child.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", env=env, start_new_session=True,
        )
        child.started_at = time.monotonic()
        threading.Thread(target=self._pump, args=(child, child.proc), daemon=True).start()

    def _pump(self, child: Child, proc: subprocess.Popen[str]) -> None:
        width = max(len(c.name) for c in [self.stack.controller, self.stack.api, *self.stack.workers])
        with open(child.log_path, "a", encoding="utf-8") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                child.tail = (child.tail + [line.rstrip()])[-20:]
                self.say(f"{child.name:<{width}} | {line.rstrip()}")

    def wait_ready(self, child: Child, check: Any, what: str, timeout: float = 600) -> None:
        started = time.monotonic()
        last_note = started
        while True:
            if child.proc is not None and child.proc.poll() is not None:
                tail = "\n    ".join(child.tail[-10:])
                raise StackError(f"{child.name} exited with code {child.proc.returncode} while "
                                 f"starting; its last lines:\n    {tail}\n  full log: {child.log_path}")
            try:
                if check():
                    return
            except (httpx.HTTPError, ValueError):
                pass
            now = time.monotonic()
            if now - started > timeout:
                raise StackError(f"{child.name} was not ready after {timeout:.0f} s ({what})")
            if now - last_note >= 5:
                self.say(f"  ... still waiting for {child.name} ({what}, {now - started:.0f} s)")
                last_note = now
            time.sleep(0.1)

    def up(self) -> None:
        s = self.stack
        t0 = time.monotonic()
        n = 2 + len(s.workers)
        self.say(f"[1/{n}] starting the controller on {s.controller_url}")
        self.start(s.controller)
        self.wait_ready(s.controller, lambda: httpx.get(s.controller_url + "/test_connection",
                                                        timeout=1).status_code == 200,
                        "controller answering")
        for i, w in enumerate(s.workers):
            self.say(f"[{i + 2}/{n}] starting {w.name} on {w.url} (loading the model)")
            self.start(w)

        auth = auth_headers(s.token)

        def registered() -> set[str]:
            table = httpx.get(s.controller_url + "/worker_table", headers=auth, timeout=1).json()
            return {w["name"] for w in table["workers"]}

        for w in s.workers:
            self.wait_ready(w, lambda w=w: w.url in registered(), "model loading and registration")
            self.say(f"  {w.name} ready ({time.monotonic() - w.started_at:.1f} s)")
        self.say(f"[{n}/{n}] starting the API server on {s.api_url}")
        self.start(s.api)
        want = set()
        for w in s.workers:
            st = httpx.post(w.url + "/worker_get_status", headers=auth, timeout=2).json()
            want.update(st["model_names"])

        def api_ready() -> bool:
            r = httpx.get(s.api_url + "/health", timeout=1)
            return r.status_code == 200 and want <= set(r.json().get("models", []))

        self.wait_ready(s.api, api_ready, "API listing every model")
        model = sorted(want)[0]
        self.say("")
        self.say(f"llmrelay is up in {time.monotonic() - t0:.1f} s: OpenAI-compatible API at "
                 f"{s.api_url}/v1 serving {', '.join(sorted(want))}")
        self.say("Try:")
        self.say(f"  curl {s.api_url}/v1/chat/completions -H 'Content-Type: application/json' \\")
        self.say(f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
                 f"\"content\": \"Hello!\"}}]}}'")
        self.say(f"Logs are kept in {self.log_dir}/. Press Ctrl-C to stop.")

    def children(self) -> list[Child]:
        return [self.stack.controller, *self.stack.workers, self.stack.api]

    def supervise(self) -> None:
        """Restart children that die, with backoff, until asked to stop."""
        while not self.stopping:
            for child in self.children():
                if self.stopping or child.proc is None or child.proc.poll() is None:
                    continue
                code = child.proc.returncode
                delay = min(2 ** child.restarts, 30)
                if time.monotonic() - child.started_at > 60:
                    child.restarts, delay = 0, 1
                self.say(f"{child.name} exited with code {code}; restarting in {delay} s "
                         f"(log: {child.log_path})")
                time.sleep(delay)
                if not self.stopping:
                    child.restarts += 1
                    self.start(child)
            time.sleep(0.2)

    def down(self) -> None:
        self.stopping = True
        # API first (stops taking requests), then workers (they deregister), then the controller.
        for tier in ([self.stack.api], self.stack.workers, [self.stack.controller]):
            for child in tier:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for child in tier:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{child.name} did not stop in time; killing it")
                    child.proc.kill()
                    child.proc.wait()
        self.say("llmrelay stopped.")


def run(args: argparse.Namespace) -> None:
    try:
        stack, log_dir = load_stack(args.stack, args.log_dir)
    except StackError as e:
        sys.exit(f"error: {e}")
    launcher = Launcher(stack, log_dir)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        launcher.up()
        launcher.supervise()
    except KeyboardInterrupt:
        launcher.say("\nstopping ...")
    except StackError as e:
        launcher.say(f"error: {e}")
        launcher.down()
        sys.exit(1)
    launcher.down()
