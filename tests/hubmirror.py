"""A Hugging Face hub for tests: olah (PyPI), a self-hosted hub mirror, serving git repositories
built at test time from the bundled models (`offline = true`: it never reaches out). The real
`huggingface_hub` client downloads from it when HF_ENDPOINT points at it.

olah serves a local repository's files whole, ignoring Range, where the real hub's file storage
answers ranges; `RangeFront` puts ranges in front of it (a byte-slicing HTTP proxy that also
counts the bytes it sends), so that a resumed download can be seen to fetch only the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from conftest import free_port, wait_for
from llmrelay.worker.models import resolve

OLAH = Path(sys.executable).with_name("olah-cli")


def bundled() -> dict[str, Path]:
    return {a: resolve(a).path for a in ("smollm2", "gemma3-270m", "all-minilm-l6-v2")}


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "core.compression=0", "-c", "user.name=t",
                           "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def commit(repo: Path, files: dict[str, Path | str], message: str) -> str:
    """Add `files` (path in the repository -> a file to link or copy, or text) and commit; the
    commit's hash."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "-q", "-b", "main")
    for name, what in files.items():
        if isinstance(what, Path):
            _place(what, repo / name)
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(what)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def split_gguf(src: Path, out: Path) -> list[Path]:
    """`src` written again as a two-part split GGUF (llama.cpp's naming), with the gguf package."""
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess,
                             split_max_tensors=(len(reader.tensors) + 1) // 2)
    copy_with_new_metadata(reader, writer, {}, [])
    return sorted(out.parent.glob(out.stem + "-*-of-*.gguf"))


class Mirror:
    """olah serving every repository under `root/models/ORG/NAME`, with its log."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "olah.log"
        config = work / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{work / "cache"}"\n'
            f'mirrors-path = ["{root}"]\n[accessibility]\noffline = true\n')
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(OLAH), "-c", str(config)], cwd=work, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: httpx.get(self.url + "/api/models/x/y/revision/main").status_code
                 in (401, 404), 60, "olah answering")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class RangeFront:
    """An HTTP proxy to `upstream` that answers `Range: bytes=N-` on files with a 206 of the
    rest (olah's local repositories are served whole), counting the file bytes it sends."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.sent = 0
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self.forward(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self.forward(body=True)

            def forward(self, body: bool) -> None:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "range", "accept-encoding")}
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                with httpx.Client(follow_redirects=True, timeout=60) as c:
                    if not body:
                        r = c.head(front.upstream + self.path, headers=headers)
                        self.send_response(r.status_code)
                        for k, v in r.headers.items():
                            if k.lower() not in ("transfer-encoding", "connection"):
                                self.send_header(k, v)
                        self.end_headers()
                        return
                    with c.stream("GET", front.upstream + self.path, headers=headers) as r:
                        data = r.read()
                    part = data[start:] if r.status_code == 200 else data
                    self.send_response(206 if start and r.status_code == 200 else r.status_code)
                    for k, v in r.headers.items():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                             "content-encoding"):
                            self.send_header(k, v)
                    if start and r.status_code == 200:
                        self.send_header("Content-Range",
                                         f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(part)))
                    self.end_headers()
                    if "/resolve/" in self.path:
                        front.sent += len(part)
                    for i in range(0, len(part), 1 << 18):
                        self.wfile.write(part[i:i + (1 << 18)])

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
