"""`llmrelay up [stack.toml]`: the whole stack as child processes, from one command.

Starts the controller, then the workers (in parallel), then the API server; waits until each is
really ready (controller answers, worker registered, API lists every model) instead of sleeping;
prefixes each child's log lines and keeps them in `log_dir`; restarts a child that crashes; and
stops everything on Ctrl-C, SIGTERM or SIGHUP. The stack file's keys are the commands' own flags
(with `_` or `-`), checked by the same parsers, so the file cannot drift from the commands.
See docs/stack-file.md.

Never leaving children behind:
- the signal handler only counts signals; the main loop notices. The first signal stops the
  children in order (API, workers, controller; SIGTERM, then SIGKILL after 15 s); a second one
  kills at once whatever has not stopped yet. Shutdown is never abandoned half way.
- each child ends when `up` ends, even on `kill -9` (llmrelay.lifeline: a parent-death signal
  set by the child itself; the module says why that mechanism).
- the registration token and the children's pids are kept in the state folder
  (llmrelay.stackstate); a later `up` that finds its earlier children still holding the ports
  says which and how to stop them, and a port held by anything else is named with its process
  (llmrelay.ports).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from llmrelay import lifeline
from llmrelay.config import add_api_args, add_controller_args, add_worker_args, split_csv
from llmrelay.ondemand import stack as ondemand
from llmrelay.ondemand.catalog import parse_flags, to_argv
from llmrelay.ports import bind_error, port_taken
from llmrelay.registry import stack as stack_registry
from llmrelay.security import TOKEN_ENV, auth_headers
from llmrelay.stackstate import StackState, stack_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class StackError(Exception):
    """The stack file or the machine cannot run this stack; the message says why."""


class Stopping(Exception):
    """A signal asked `up` to stop while it was starting or watching its children."""


DEFAULT_STACK: dict[str, Any] = {
    "controller": {},
    "api": {},
    "worker": [{"model_path": "smollm2"}],
}


def _argv(section: dict[str, Any], where: str) -> list[str]:
    try:
        return to_argv(section, where)
    except ValueError as e:
        raise StackError(str(e)) from e


def _parse(add: Any, argv: list[str], where: str) -> argparse.Namespace:
    try:
        return parse_flags(add, argv, where)
    except ValueError as e:
        raise StackError(str(e)) from e


@dataclass
class Child:
    name: str
    argv: list[str]
    url: str
    log_path: Path
    host: str = "127.0.0.1"
    port: int | None = None
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
    registry: stack_registry.RegistryPlan | None = None  # registry = ... (registry/stack.py)
    nats: Child | None = None  # its local nats-server, started first
    admin_key: str = ""  # of the host, when models are loaded on demand
    on_demand: list[str] = field(default_factory=list)


def load_stack(path: str | None, log_dir: str | None,
               models_dir: str | None = None) -> tuple[Stack, Path]:
    """Read and check a stack file (or the default stack) into the commands to run."""
    if path is None:
        # --models-dir alone: the folder's models, on demand, and no default model
        data = {"controller": {}, "api": {}} if models_dir else DEFAULT_STACK
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
                           "registration_token", "host", *stack_registry.KEYS}
    if unknown:
        raise StackError(f"unknown section {sorted(unknown)[0]!r}; expected [controller], [api], "
                         "[[worker]] and log_dir")
    logs = Path(log_dir or data.get("log_dir") or base / "logs")
    workers = data.get("worker", data.get("workers", []))
    if isinstance(workers, dict):
        workers = [workers]
    workers, managed = ondemand.split([dict(w) for w in workers])  # on demand: for the host
    if not workers and not managed and not models_dir:
        raise StackError("the stack has no [[worker]]")

    # The cluster secret: from the file or the environment, else a fresh one for this run.
    token = data.get("registration_token", os.environ.get(TOKEN_ENV)) or secrets.token_urlsafe(24)
    if not isinstance(token, str):
        raise StackError("registration_token must be a string")
    secret_env = {TOKEN_ENV: token}
    c_args = _parse(add_controller_args, _argv(dict(data.get("controller", {})), "[controller]"),
                    "[controller]")
    controller_url = f"http://{_client_host(c_args.host)}:{c_args.port}"
    try:
        registry = stack_registry.plan(data, stack_dir(controller_url))
    except ValueError as e:
        raise StackError(str(e)) from e
    if registry is not None:  # every process gets --registry (and the local server's token)
        data = registry.into(data)
        workers = data["worker"]
        secret_env.update(registry.env(token))
    c_argv = _argv(dict(data.get("controller", {})), "[controller]")
    py = [sys.executable, "-m", "llmrelay.cli"]
    controller = Child("controller", py + ["controller"] + c_argv, controller_url,
                       logs / "controller.log", c_args.host, c_args.port, env=secret_env)

    children: list[Child] = []
    used_ports = {c_args.port}
    names: set[str] = set()
    served: list[str] = []  # the model names the stack's workers declare
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
        served += [n for n in split_csv(w_args.model_names) if n not in served]
        label = (w_args.model_names or w_args.model_path).split(",")[0].strip()
        label = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)
        name = f"worker-{label}"
        while name in names:
            name += "-2"
        names.add(name)
        url = w_args.worker_address or f"http://{_client_host(w_args.host)}:{w_args.port}"
        children.append(Child(name, py + ["worker"] + w_argv, url, logs / f"{name}.log",
                              w_args.host, w_args.port, env=secret_env))
    try:
        host = ondemand.plan(managed, dict(data.get("host", {})), models_dir, base, controller_url,
                             c_args.heartbeat_interval, logs, used_ports,
                             max(1, (os.cpu_count() or 1) // (len(workers) + len(managed) or 1)))
    except ValueError as e:
        raise StackError(str(e)) from e
    if host is not None:  # the host of the models loaded on demand: a worker for `up`
        used_ports.add(host.port)
        children.append(Child("host", host.argv, host.url, logs / "host.log", host.host,
                              host.port, env={**secret_env, **host.env}))

    a = dict(data.get("api", {}))
    a.setdefault("controller_address", controller_url)
    if served:  # 503 with Retry-After, not 404, while their worker starts or restarts
        a.setdefault("expect_models", ",".join(served))
    keys = a.pop("api_keys", None)
    api_env = dict(secret_env)
    if keys:
        api_env["LLMRELAY_API_KEYS"] = ",".join(keys) if isinstance(keys, list) else str(keys)
    if host is not None:  # the host's admin key (LLMRELAY_ADMIN_KEY), the API server's
        api_env.update(host.env)  # --host-admin-key: the web console's load/unload/pin buttons
    a_argv = _argv(a, "[api]")
    a_args = _parse(add_api_args, a_argv, "[api]")
    if a_args.port in used_ports:
        raise StackError(f"[api]: port {a_args.port} is already used by another process of the stack")
    api_url = f"http://{_client_host(a_args.host)}:{a_args.port}"
    api = Child("api", py + ["api"] + a_argv, api_url, logs / "api.log", a_args.host, a_args.port,
                env=api_env)
    stack = Stack(controller, children, api, controller_url, api_url, [c.url for c in children],
                  token, registry, admin_key=host.admin_key if host else "",
                  on_demand=host.models if host else [])
    if registry is not None and registry.port is not None:
        stack.nats = Child("nats", registry.server_argv(), registry.url, logs / "nats.log",
                           "127.0.0.1", registry.port, env=secret_env)
    for child in [*([stack.nats] if stack.nats else []), controller, *children, api]:
        assert child.port is not None
        _check_port(child.name, child.host, child.port)
    return stack, logs


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _check_port(name: str, host: str, port: int) -> None:
    """Refuse a port the child could not listen on, naming who holds it where the system says."""
    err = bind_error(host, port)
    if err is not None:
        raise StackError(port_taken(name, host, port, err))


class Launcher:
    """Starts, watches and stops the children of one stack. Signals only set `signals`."""

    def __init__(self, stack: Stack, log_dir: Path, out: TextIO = sys.stdout,
                 state: StackState | None = None, stop_timeout: float = 15.0) -> None:
        self.stack = stack
        self.log_dir = log_dir
        self.out = out
        self.state = state
        self.token_file: Path | None = None
        self.admin_key_file: Path | None = None
        self.stop_timeout = stop_timeout
        self.lock = threading.Lock()
        self.stopping = False
        self.signals = 0  # stop signals received: 1 = stop in order, 2 or more = kill now
        self.signals_at_down = 0

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT / SIGTERM / SIGHUP handler: count, nothing else.

        It runs in the main thread between two bytecodes, possibly while that thread holds
        `self.lock` or is inside `down()`: raising here (as KeyboardInterrupt would) abandons
        whatever was running, and taking a lock can deadlock. The loops poll the count.
        """
        self.signals += 1

    @property
    def hurry(self) -> bool:
        """Kill what has not stopped: a second signal, or any signal during a stop it did not ask
        for (after an error)."""
        return self.stopping and (self.signals >= 2 or self.signals > self.signals_at_down)

    def check_stop(self) -> None:
        if self.signals:
            raise Stopping

    def pause(self, seconds: float) -> None:
        """Sleep, but return early (raising Stopping) when a signal asks to stop."""
        end = time.monotonic() + seconds
        while True:
            self.check_stop()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def say(self, msg: str) -> None:
        with self.lock:
            try:
                self.out.write(msg + "\n")
                self.out.flush()
            except (OSError, ValueError):  # the terminal is gone (SIGHUP) or the pipe closed
                pass

    def start(self, child: Child) -> None:
        # PR_SET_PDEATHSIG (llmrelay.lifeline) fires when the *thread* that started the child
        # ends: only the main thread, which lives as long as `up`, may start children.
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Launcher.start must run in the main thread (see llmrelay.lifeline)")
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **child.env)
        env[lifeline.ENV] = str(os.getpid())
        child.proc = subprocess.Popen(
            child.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", env=env, start_new_session=True,
        )
        child.started_at = time.monotonic()
        if self.state is not None:
            self.state.record(child.name, child.proc.pid, child.port)
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

    def wait_ready(self, child: Child, check: Any, what: str, timeout: float = 600,
                   busy: Any = None) -> None:
        """Until `check()`; StackError when the child exits, or after `timeout` seconds of which
        none was spent while `busy()` said it was making progress (a model downloading)."""
        started = time.monotonic()
        last_note = started
        while True:
            self.check_stop()
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
            if busy is not None and now - last_note >= 5:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                    if busy():
                        started = now - 5  # a download moves on: the clock starts again
            if now - started > timeout:
                raise StackError(f"{child.name} was not ready after {timeout:.0f} s ({what})")
            if now - last_note >= 5:
                self.say(f"  ... still waiting for {child.name} ({what}, {now - started:.0f} s)")
                last_note = now
            self.pause(0.1)

    def up(self) -> None:
        s = self.stack
        t0 = time.monotonic()
        n = 2 + len(s.workers)
        if s.nats is not None and s.registry is not None:
            self.say(f"[0/{n}] starting the registry: a local nats-server on {s.nats.url}")
            self.start(s.nats)
            self.wait_ready(s.nats, lambda: s.registry.answers(s.token), "nats-server answering")
        self.say(f"[1/{n}] starting the controller on {s.controller_url}")
        self.start(s.controller)
        self.wait_ready(s.controller, lambda: httpx.get(s.controller_url + "/test_connection",
                                                        timeout=1).status_code == 200,
                        "controller answering")
        for i, w in enumerate(s.workers):
            self.check_stop()
            self.say(f"[{i + 2}/{n}] starting {w.name} on {w.url} (" + (
                "models on demand" if w.name == "host" else "loading the model") + ")")
            self.start(w)

        auth = auth_headers(s.token)

        def table() -> list[dict[str, Any]]:
            return httpx.get(s.controller_url + "/worker_table", headers=auth,
                             timeout=1).json()["workers"]

        def registered() -> set[str]:  # not while it only says it downloads its model
            return {w["name"] for w in table() if w.get("model_names")
                    or not ((w.get("status") or {}).get("llmrelay") or {}).get("downloading")}

        def downloading(url: str) -> bool:
            return any(w["name"] == url and ((w.get("status") or {}).get("llmrelay") or {})
                       .get("downloading") for w in table())

        for w in s.workers:
            self.wait_ready(w, lambda w=w: w.url in registered(), "model loading and registration",
                            busy=lambda w=w: downloading(w.url))
            self.say(f"  {w.name} ready ({time.monotonic() - w.started_at:.1f} s)")
        self.check_stop()
        self.say(f"[{n}/{n}] starting the API server on {s.api_url}")
        self.start(s.api)
        want = set()
        for w in s.workers:
            st = httpx.post(w.url + "/worker_get_status", headers=auth, timeout=2).json()
            want.update(st["model_names"])

        # /health lists the models to an admin key only (the stack's plain keys are admin keys)
        plain = s.api.env.get("LLMRELAY_API_KEYS") or os.environ.get("LLMRELAY_API_KEYS") or ""
        key = plain.split(",")[0].strip()
        admin = {"Authorization": f"Bearer {key}"} if key else {}

        def api_ready() -> bool:
            r = httpx.get(s.api_url + "/health", headers=admin, timeout=1)
            if r.status_code != 200:
                return False
            # Without a key the launcher knows (keys file only) there is no list to wait for;
            # the workers were ready before the API server started, which reads their table
            # before it answers.
            body = r.json()
            return "models" not in body or want <= set(body["models"])

        self.wait_ready(s.api, api_ready, "API listing every model")
        model = sorted(want or s.on_demand)[0]
        self.say("")
        self.say(f"llmrelay is up in {time.monotonic() - t0:.1f} s: OpenAI-compatible API at "
                 f"{s.api_url}/v1 serving {', '.join(sorted(want)) or 'no model loaded yet'}")
        if s.on_demand:
            self.say(f"Loaded on demand: {', '.join(s.on_demand)}. `llmrelay models list` shows "
                     f"them (the admin key is in {self.admin_key_file}).")
        self.say("Try:")
        self.say(f"  curl {s.api_url}/v1/chat/completions -H 'Content-Type: application/json' \\")
        self.say(f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
                 f"\"content\": \"Hello!\"}}]}}'")
        self.say(f"  llmrelay status --controller-address {s.controller_url}")
        for line in s.registry.banner(self.token_file) if s.registry is not None else []:
            self.say(line)
        if self.token_file is not None:
            self.say(f"The registration token (controller and worker endpoints, their /metrics) is "
                     f"in {self.token_file}, readable only by you; `llmrelay status` finds it there.")
        self.say(f"Logs are kept in {self.log_dir}/. Press Ctrl-C to stop.")

    def children(self) -> list[Child]:
        nats = [self.stack.nats] if self.stack.nats is not None else []
        return [*nats, self.stack.controller, *self.stack.workers, self.stack.api]

    def supervise(self) -> None:
        """Restart children that die, with backoff, until a signal asks to stop (Stopping)."""
        while True:
            for child in self.children():
                self.check_stop()
                if child.proc is None or child.proc.poll() is None:
                    continue
                code = child.proc.returncode
                delay = min(2 ** child.restarts, 30)
                if time.monotonic() - child.started_at > 60:
                    child.restarts, delay = 0, 1
                self.say(f"{child.name} exited with code {code}; restarting in {delay} s "
                         f"(log: {child.log_path})")
                self.pause(delay)
                child.restarts += 1
                self.start(child)
            self.pause(0.2)

    def _alive(self, children: list[Child]) -> list[Child]:
        return [c for c in children if c.proc is not None and c.proc.poll() is None]

    def down(self) -> None:
        """Stop every child: in order with SIGTERM; at once with SIGKILL after a second signal."""
        self.signals_at_down = self.signals
        self.stopping = True
        # API first (stops taking requests), then workers (they deregister), then the controller.
        for tier in ([self.stack.api], self.stack.workers, [self.stack.controller],
                     [self.stack.nats] if self.stack.nats is not None else []):
            if self.hurry:
                break
            live = self._alive(tier)
            for child in live:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while live and not self.hurry and time.monotonic() < deadline:
                time.sleep(0.05)
                live = self._alive(live)
            if live and not self.hurry:
                for child in live:
                    assert child.proc is not None
                    self.say(f"{child.name} did not stop in {self.stop_timeout:g} s; killing it")
                    child.proc.kill()
        if self.hurry:
            live = self._alive(self.children())
            if live:
                self.say(f"second signal: killing {', '.join(c.name for c in live)}")
            for child in live:
                assert child.proc is not None
                child.proc.kill()
        for child in self.children():
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                self.say(f"{child.name} (pid {child.proc.pid}) has not ended; stop it with "
                         f"`kill -9 {child.proc.pid}`")
        if self.state is not None:
            self.state.clear()
        self.say("llmrelay stopped.")


def run(args: argparse.Namespace) -> None:
    try:
        stack, log_dir = load_stack(args.stack, args.log_dir, getattr(args, "models_dir", None))
    except StackError as e:
        sys.exit(f"error: {e}")
    state = StackState(stack.controller_url)
    launcher = Launcher(stack, log_dir, state=state)
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # SIGHUP: the terminal closed
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), launcher.on_signal)
    code = 0
    try:
        assert stack.token is not None
        try:
            launcher.token_file = state.begin(stack.token)
            if stack.admin_key:
                launcher.admin_key_file = state.write_admin_key(stack.admin_key)
        except OSError as e:
            raise StackError(f"cannot write the token file in {state.dir} ({e.strerror or e}): "
                             "set LLMRELAY_STATE_DIR to a folder you can write") from e
        launcher.up()
        launcher.supervise()
    except Stopping:
        launcher.say("\nstopping ... (signal again to kill what has not stopped yet)")
    except StackError as e:
        launcher.say(f"error: {e}")
        code = 1
    finally:
        launcher.down()
    sys.exit(code)
