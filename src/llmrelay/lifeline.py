"""A child of `llmrelay up` ends when `up` ends, even when `up` is killed with SIGKILL.

`up` starts each child with LLMRELAY_DIE_WITH_PARENT=<its own pid>. The child's first act
(`llmrelay.cli.main`, before any heavy import) is `hold()`: on Linux it asks the kernel for
SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), then checks that the parent is still
the one named, since a parent that died before the `prctl` call would never signal. Elsewhere
a daemon thread watches `getppid()` once a second and sends the process SIGTERM itself.

Why this and not the alternatives:
- `preexec_fn` (the same `prctl` between fork and exec) is documented as unsafe when the parent
  has threads, and `up` has a log thread per child.
- Keeping the children in `up`'s process group does not help with `kill -9 <pid of up>` (nothing
  is sent to the group), and a Ctrl-C would reach every child at once, out of order.
- SIGTERM rather than SIGKILL: each server stops the way it does on Ctrl-C (a worker
  deregisters, a managed server gets its own parent-death signal), and ends open requests after
  its `--shutdown-timeout`.

PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so `up` starts its children
from its main thread only. The variable is removed from the environment so that grandchildren
(a worker's managed server) do not inherit it; they have their own guard.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

ENV = "LLMRELAY_DIE_WITH_PARENT"
PR_SET_PDEATHSIG = 1


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def hold() -> None:
    """If started by `up` (LLMRELAY_DIE_WITH_PARENT set), end with it; otherwise do nothing."""
    value = os.environ.pop(ENV, "")
    if not value.isdigit():
        return
    parent = int(value)
    armed = False
    if sys.platform == "linux":
        try:
            import ctypes

            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # `up` died before we could ask to be told
        sys.exit(f"llmrelay: the parent process {parent} is gone; not starting")
    if not armed:
        threading.Thread(target=_watch, args=(parent,), name="lifeline", daemon=True).start()
