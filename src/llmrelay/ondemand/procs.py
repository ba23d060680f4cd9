"""One model's worker process, started and stopped by the host: `llmrelay worker` with the
model's flags, its output kept (the last lines say why a load failed) and passed on with the
model's name in front, ready when it answers `/worker_get_status`.

The worker is told to end with the host (llmrelay.lifeline: the host's pid in
LLMRELAY_DIE_WITH_PARENT, acted on by the worker's first line of code), so a host killed with
-9 leaves no worker behind. The host starts workers from its event loop, which runs in its main
thread: the parent-death signal is tied to the thread that started the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

from llmrelay import lifeline

log = logging.getLogger("llmrelay.host")

_CAUSE = re.compile(r"cannot start the worker: (.*)$")


class LoadFailed(Exception):
    """The worker did not become ready; the message is the cause, from its own words."""


class WorkerProc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], address: str,
                 log_path: Path | None = None, echo: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.address = address
        self.log_path = log_path
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.tail: deque[str] = deque(maxlen=40)
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env[lifeline.ENV] = str(os.getpid())
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=env, start_new_session=True)
        self._pump = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out: IO[str] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    return
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                if out is not None:
                    out.write(line + "\n")
                    out.flush()
                self.echo(f"[{self.name}] {line}")
        finally:
            if out is not None:
                out.close()

    def cause(self) -> str:
        """Why the worker failed, in its own words where it said so."""
        for line in reversed(self.tail):
            m = _CAUSE.search(line)
            if m:
                return m.group(1).strip()
        code = self.proc.returncode if self.proc is not None else None
        lines = [t for t in self.tail if t.strip()]
        last = lines[-1].strip() if lines else "no output"
        what = f"exited with code {code}" if code is not None else "did not become ready"
        return f"its worker {what} (last line: {last[-300:]})"

    async def start(self, ready: Callable[[], Awaitable[bool]], timeout: float) -> None:
        """Start the process and wait until `ready()`; LoadFailed with the cause otherwise."""
        await self.spawn()
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc.returncode is not None:
                await self._drain_output()
                raise LoadFailed(self.cause())
            with contextlib.suppress(Exception):
                if await ready():
                    return
            if loop.time() > deadline:
                await self.stop(5.0)
                raise LoadFailed(f"its worker was not ready after {timeout:.0f} s (raise "
                                 f"--load-timeout if the model is that slow to load); "
                                 f"{self.cause()}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), 0.1)

    async def _drain_output(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        await self._drain_output()
        return code

    def terminate(self) -> None:
        """SIGTERM: the worker deregisters, refuses new requests, finishes what it runs."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("the worker of %s did not stop in %.0f s; killing it", self.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return await self.wait()
