"""`llmrelay up` as an operator meets it (issue 17): the token file that `llmrelay status`, a
worker started by hand and Prometheus use; no child left behind after two signals or a
`kill -9`; its own leftovers named with how to stop them; and a port check that agrees with
what the servers can bind (TIME_WAIT is fine, a listener is named)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, wait_for

UP = [sys.executable, "-m", "llmrelay.cli", "up"]


class Up:
    """One `llmrelay up` process with a one-worker stack on free ports."""

    def __init__(self, tmp_path: Path, env: dict[str, str], name: str = "up",
                 cport: int | None = None) -> None:
        self.cport, self.wport, self.aport = cport or free_port(), free_port(), free_port()
        self.controller = f"http://127.0.0.1:{self.cport}"
        self.worker = f"http://127.0.0.1:{self.wport}"
        self.api = f"http://127.0.0.1:{self.aport}"
        self.stack = tmp_path / f"{name}.toml"
        self.stack.write_text(f"""
log_dir = "{tmp_path / (name + '-logs')}"

[controller]
port = {self.cport}
heartbeat_interval = 1

[api]
port = {self.aport}

[[worker]]
model_path = "smollm2"
model_names = ["smol"]
port = {self.wport}
context_length = 512
n_threads = 1
""")
        self.out = tmp_path / f"{name}.out"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def ports(self) -> list[int]:
        return [self.cport, self.wport, self.aport]

    def start(self) -> Up:
        self.proc = subprocess.Popen([*UP, str(self.stack)], stdout=open(self.out, "wb"),
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_up(self) -> None:
        assert self.proc is not None
        wait_for(lambda: "llmrelay is up" in self.text() or self.proc.poll() is not None, 120,
                 "llmrelay up")
        assert "llmrelay is up" in self.text(), self.text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def command_of(pid: int) -> str:
    return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())


def alive(pid: int) -> bool:
    """Running, not a zombie (a child of a killed `up` may wait a moment to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def port_free(port: int) -> bool:
    """Whether a server could listen on the port now (as uvicorn binds: SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def nothing_left(pids: list[int], ports: list[int]) -> bool:
    return not any(alive(p) for p in pids) and all(port_free(p) for p in ports)


def chat(api: str) -> str:
    c = openai.OpenAI(base_url=api + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                  max_tokens=4)
    return r.choices[0].message.content or ""


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """The documented default place ($XDG_STATE_HOME/llmrelay), under this test's folder."""
    e = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    e.pop("LLMRELAY_REGISTRATION_TOKEN", None)
    e.pop("LLMRELAY_STATE_DIR", None)
    return e


def scrape(url: str, token_file: Path) -> dict[str, float]:
    """What Prometheus does with `authorization: {type: Bearer, credentials_file: ...}`."""
    token = token_file.read_text().strip()
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}


def test_status_worker_and_prometheus_find_the_token_up_generated(
        tmp_path: Path, env: dict[str, str]) -> None:
    up = Up(tmp_path, env).start()
    extra: subprocess.Popen[bytes] | None = None
    try:
        up.wait_up()
        token_file = tmp_path / "xdg" / "llmrelay" / "stacks" / f"127.0.0.1-{up.cport}" / "token"
        assert str(token_file) in up.text()  # the banner says where it is
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        token = token_file.read_text().strip()
        assert token and token not in up.text()

        # the token-protected endpoints, scraped as docs/observability.md configures Prometheus
        for url in (up.controller, up.worker):
            assert httpx.get(url + "/metrics").status_code == 401
        assert scrape(up.controller, token_file)["llmrelay_controller_workers_alive"] == 1
        assert "llmrelay_worker_queue_length" in scrape(up.worker, token_file)

        # `llmrelay status` with no token flag, as the README shows it (any loopback spelling)
        for address in (up.controller, f"http://localhost:{up.cport}/"):
            r = subprocess.run([sys.executable, "-m", "llmrelay.cli", "status",
                                "--controller-address", address], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert "1 workers, 1 models (smol)" in r.stdout and up.worker in r.stdout

        # a worker started by hand joins the stack without being told the token
        wport = free_port()
        extra = subprocess.Popen([sys.executable, "-m", "llmrelay.cli", "worker", "--port",
                                  str(wport), "--controller-address", up.controller,
                                  "--model-path", "smollm2", "--model-names", "extra",
                                  "--context-length", "512", "--n-threads", "1"],
                                 stdout=open(tmp_path / "extra.log", "wb"),
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        auth = {"Authorization": f"Bearer {token}"}
        wait_for(lambda: f"http://127.0.0.1:{wport}" in {
            w["name"] for w in httpx.get(up.controller + "/worker_table", headers=auth)
            .json()["workers"]}, 60, "the hand-started worker to register")
    finally:
        if extra is not None:
            extra.terminate()
            extra.wait(30)
        up.stop()
    assert "llmrelay stopped" in up.text()
    assert not token_file.exists()  # a stopped stack leaves no secret behind


@pytest.mark.parametrize("signals", [
    [signal.SIGTERM, signal.SIGTERM],
    [signal.SIGINT, signal.SIGINT],
    [signal.SIGKILL],
], ids=["sigterm-twice", "ctrl-c-twice", "kill-9"])
def test_up_leaves_no_child_behind(tmp_path: Path, env: dict[str, str],
                                   signals: list[signal.Signals]) -> None:
    up = Up(tmp_path, env).start()
    assert up.proc is not None
    pids: list[int] = []
    try:
        up.wait_up()
        pids = children_of(up.proc.pid)
        assert len(pids) == 3, [command_of(p) for p in pids]  # controller, worker, API server
        assert chat(up.api)  # a request first, as in the report: keep-alive connections
        for sig in signals:  # a second signal within 100 ms of the first
            os.kill(up.proc.pid, sig)
            time.sleep(0.05)
        wait_for(lambda: nothing_left(pids, up.ports()), 20,
                 "every child to end and every port to be free")
        up.proc.wait(20)
        if len(signals) == 2:
            assert "llmrelay stopped" in up.text()
    finally:
        up.stop()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_up_names_its_own_leftovers_and_how_to_stop_them(tmp_path: Path,
                                                         env: dict[str, str]) -> None:
    first = Up(tmp_path, env).start()
    assert first.proc is not None
    api_pid = None
    pids: list[int] = []
    try:
        first.wait_up()
        pids = children_of(first.proc.pid)
        api_pid = next(p for p in pids if " api " in command_of(p))
        # A child that cannot act on its parent's death (stopped) outlives a `kill -9` of `up`.
        os.kill(api_pid, signal.SIGSTOP)
        first.proc.kill()
        first.proc.wait()
        wait_for(lambda: not any(alive(p) for p in pids if p != api_pid), 20,
                 "the other children to end with `up`")
        r = subprocess.run([*UP, str(first.stack)], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0
        message = r.stderr
        assert f"api: cannot listen on 127.0.0.1:{first.aport}" in message, message
        assert f"pid {api_pid}" in message and "earlier `llmrelay up`" in message, message
        assert f"kill {api_pid}" in message, message
        assert "starting the controller" not in r.stdout  # refused before starting anything
        # what it says to do works: the port is free again
        os.kill(api_pid, signal.SIGTERM)
        os.kill(api_pid, signal.SIGCONT)
        wait_for(lambda: nothing_left([api_pid], [first.aport]), 20, "the leftover to stop")
    finally:
        first.stop()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def time_wait_on(port: int) -> None:
    """Leave a TIME_WAIT on `port` and nothing listening: a server that closes first."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()  # the server side closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # a bind without SO_REUSEADDR fails (the old check)


def test_time_wait_does_not_stop_up_but_a_listener_does(tmp_path: Path,
                                                        env: dict[str, str]) -> None:
    cport = free_port()
    time_wait_on(cport)
    up = Up(tmp_path, env, cport=cport).start()
    try:
        up.wait_up()
        assert chat(up.api)
    finally:
        up.stop()
    assert "llmrelay stopped" in up.text()

    with socket.socket() as holder:  # a real listener (SO_REUSEADDR: the stop left TIME_WAITs)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", up.aport))
        holder.listen()
        r = subprocess.run([*UP, str(up.stack)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0
    assert f"api: cannot listen on 127.0.0.1:{up.aport}" in r.stderr, r.stderr
    assert f"pid {os.getpid()} (" in r.stderr and "holds that port" in r.stderr, r.stderr
