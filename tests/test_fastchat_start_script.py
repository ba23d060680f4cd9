"""A FastChat start script (the seed article's, section 4) runs with `fastchat` -> `llmrelay`.

Only the package name changes in the commands; the configuration block (model paths, names,
ports: free ones here, never the defaults; 127.0.0.1 instead of 0.0.0.0; shorter sleeps) is
what any user edits anyway. FastChat flags llmrelay does not support give a clear message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import free_port, wait_for

FASTCHAT_SCRIPT = r"""
MODEL1_PATH="smollm2"
MODEL1_NAME="smol-script"
MODEL2_PATH="gemma3-270m"
MODEL2_NAME="gemma-script"
LOG_DIR="./logs"

mkdir -p $LOG_DIR

nohup python -m fastchat.serve.controller \
--host 127.0.0.1 \
--port CPORT \
--dispatch-method shortest_queue \
> $LOG_DIR/controller.log 2>&1 &

sleep 1

nohup python -m fastchat.serve.model_worker \
--host 127.0.0.1 \
--port W1PORT \
--worker-address http://localhost:W1PORT \
--controller-address http://localhost:CPORT \
--model-path $MODEL1_PATH \
--model-names $MODEL1_NAME \
--num-gpus 1 \
> $LOG_DIR/worker1.log 2>&1 &

nohup python -m fastchat.serve.model_worker \
--host 127.0.0.1 \
--port W2PORT \
--worker-address http://localhost:W2PORT \
--controller-address http://localhost:CPORT \
--model-path $MODEL2_PATH \
--model-names $MODEL2_NAME \
--num-gpus 1 --gptq-wbits 16 --revision main \
> $LOG_DIR/worker2.log 2>&1 &

sleep 1

nohup python -m fastchat.serve.openai_api_server \
--host 127.0.0.1 \
--port APORT \
--controller-address http://localhost:CPORT \
> $LOG_DIR/api_server.log 2>&1 &

jobs -p > pids.txt
"""


def test_fastchat_start_script_runs_with_llmrelay(tmp_path: Path) -> None:
    ports = {"CPORT": free_port(), "W1PORT": free_port(), "W2PORT": free_port(),
             "APORT": free_port()}
    script = FASTCHAT_SCRIPT.replace("fastchat.serve.", "llmrelay.serve.")
    for k, v in ports.items():
        script = script.replace(k, str(v))
    (tmp_path / "start.sh").write_text(script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(["bash", "start.sh"], cwd=tmp_path, env=env, check=True, timeout=60)
    pids = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
    assert len(pids) == 4
    api = f"http://localhost:{ports['APORT']}"
    try:
        wait_for(lambda: {m["id"] for m in httpx.get(api + "/v1/models").json()["data"]}
                 == {"smol-script", "gemma-script"}, 180, "both models in the API server")
        r = httpx.post(api + "/v1/chat/completions", timeout=120, json={
            "model": "smol-script", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        log2 = (tmp_path / "logs" / "worker2.log").read_text()
        assert "--gptq-wbits 16 ignored" in log2 and "--revision main ignored" in log2
    finally:
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGTERM) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                subprocess.run(["sleep", "0.1"])


def test_unsupported_fastchat_flags_give_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "llmrelay.serve.model_worker", "--model-path", "smollm2",
         "--port", str(free_port()), "--controller-address", f"http://127.0.0.1:{free_port()}",
         "--awq-ckpt", "model.pt", "--enable-exllama", "--exllama-max-seq-len", "4096"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert "unrecognized arguments" not in r.stderr
    assert "--awq-ckpt is not supported" in r.stderr and "GGUF" in r.stderr
    assert "--enable-exllama is not supported" in r.stderr
    assert "--exllama-max-seq-len 4096 ignored" in r.stderr


def test_unknown_flags_still_fail_as_unknown(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "llmrelay.serve.model_worker", "--no-such-flag"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --no-such-flag" in r.stderr
