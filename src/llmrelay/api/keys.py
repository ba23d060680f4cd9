"""API keys with names, model allow-lists, limits and a priority class: the keys file.

`--api-keys-file keys.toml` holds one table per key, the secret stored only as its SHA-256
(keys are long random strings, so a fast hash is enough; `llmrelay keys add` makes them):

    [keys.alice]
    hash = "sha256:9f86d0..."
    models = ["smol*", "gemma"]        # names or globs; default: every model
    priority = "interactive"           # or "batch" (queued after interactive work)
    requests_per_minute = 60           # each limit optional: absent means none
    tokens_per_minute = 20000
    concurrent = 4
    tokens_per_day = 1000000
    admin = true                       # may read /v1/usage, /metrics, /api/workers, /health's details

    [keys.prometheus]
    hash = "sha256:5e884..."
    metrics_only = true                # may read /metrics and nothing else (a scrape credential)

The file is re-read when it changes (checked at most once a second), without a restart; a file
that no longer parses keeps the keys last read, and says so in the log. A plain key list
(`--api-keys`, or a keys file of one key per line, FastChat's way) still works: such keys have
no limits, every model, the name `key-N` (N: its place in the list), and are admin keys (the
operator's own keys, as in FastChat, where every key may do everything).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("llmrelay.api")

LIMITS = ("requests_per_minute", "tokens_per_minute", "concurrent", "tokens_per_day")
PRIORITIES = ("interactive", "batch")


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Key:
    """One API key as the server knows it (never the secret itself)."""

    name: str
    models: tuple[str, ...] = ()  # empty: every model
    priority: str = "interactive"
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None
    tokens_per_day: int | None = None
    admin: bool = False
    metrics_only: bool = False  # a scrape credential: /metrics, nothing else

    def may_use(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, m) for m in self.models)

    @property
    def limited(self) -> bool:
        return any(getattr(self, n) is not None for n in LIMITS)


def parse_keys(data: dict[str, Any], where: str = "keys file") -> dict[str, Key]:
    """Key digests -> keys, from a keys file's TOML tables."""
    tables = data.get("keys")
    if not isinstance(tables, dict) or not tables:
        raise KeysFileError(f"{where}: no [keys.NAME] tables")
    out: dict[str, Key] = {}
    for name, t in tables.items():
        at = f"{where}: [keys.{name}]"
        if not isinstance(t, dict):
            raise KeysFileError(f"{at} must be a table")
        h = t.get("hash")
        if not isinstance(h, str) or not h.startswith("sha256:") or len(h) != 71:
            raise KeysFileError(f"{at}: hash must be 'sha256:' and 64 hex digits "
                                "(make keys with `llmrelay keys add`)")
        unknown = set(t) - {"hash", "models", "priority", "admin", "metrics_only", *LIMITS}
        if unknown:
            raise KeysFileError(f"{at}: unknown setting(s) {', '.join(sorted(unknown))}")
        models = t.get("models", [])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise KeysFileError(f"{at}: models must be a list of names or globs")
        priority = t.get("priority", "interactive")
        if priority not in PRIORITIES:
            raise KeysFileError(f"{at}: priority must be one of {', '.join(PRIORITIES)}")
        limits = {}
        for n in LIMITS:
            v = t.get(n)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise KeysFileError(f"{at}: {n} must be a whole number of at least 1")
            limits[n] = v
        if t.get("admin") and t.get("metrics_only"):
            raise KeysFileError(f"{at}: a key is admin or metrics_only, not both")
        if h in out:
            raise KeysFileError(f"{at}: the same key is also [keys.{out[h].name}]")
        out[h] = Key(name=str(name), models=tuple(models), priority=priority,
                     admin=bool(t.get("admin", False)),
                     metrics_only=bool(t.get("metrics_only", False)), **limits)
    return out


def plain_keys(keys: list[str]) -> dict[str, Key]:
    return {digest(k): Key(name=f"key-{i + 1}", admin=True) for i, k in enumerate(keys) if k}


class KeyStore:
    """The keys in use: from `--api-keys` and/or a keys file, reloaded when the file changes."""

    def __init__(self, plain: list[str] | None = None, path: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plain = plain_keys(plain or [])
        self.path = Path(path) if path else None
        self.clock = clock
        self.from_file: dict[str, Key] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = float("-inf")
        if self.path is not None:
            self.from_file = self._read()

    @property
    def enabled(self) -> bool:
        return bool(self.plain or self.from_file or self.path)

    def lookup(self, secret: str) -> Key | None:
        """The key for a presented secret (None: no such key)."""
        self._maybe_reload()
        h = digest(secret)
        return self.from_file.get(h) or self.plain.get(h)

    def keys(self) -> list[Key]:
        return list(self.from_file.values()) + list(self.plain.values())

    def _read(self) -> dict[str, Key]:
        assert self.path is not None
        st = self.path.stat()
        self._stamp = (st.st_mtime, st.st_size)
        text = self.path.read_text(encoding="utf-8")
        if "[keys" not in text:  # FastChat's way: one key per line
            return plain_keys([line.strip() for line in text.splitlines()
                               if line.strip() and not line.startswith("#")])
        try:
            return parse_keys(tomllib.loads(text), str(self.path))
        except tomllib.TOMLDecodeError as e:
            raise KeysFileError(f"{self.path}: not valid TOML ({e})") from e

    def _maybe_reload(self) -> None:
        if self.path is None or self.clock() - self._checked < 1.0:
            return
        self._checked = self.clock()
        try:
            st = self.path.stat()
            if (st.st_mtime, st.st_size) == self._stamp:
                return
            self.from_file = self._read()
            log.info("keys file %s re-read: %d keys", self.path, len(self.from_file))
        except (OSError, KeysFileError) as e:
            log.error("keys file %s could not be re-read (%s); keeping the %d keys read before",
                      self.path, e, len(self.from_file))


def add_key(path: Path, name: str, models: list[str] | None = None, priority: str = "interactive",
            admin: bool = False, metrics_only: bool = False, **limits: int | None) -> str:
    """Make a new key NAME in the keys file (created 0600 if missing); returns the secret,
    which is stored nowhere."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise KeysFileError("a key's name may hold letters, digits, - and _ only")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    existing = tomllib.loads(text).get("keys", {}) if text.strip() else {}
    if name in existing:
        raise KeysFileError(f"{path} already has a key named {name}")
    secret = "sk-" + secrets.token_urlsafe(32)
    head = "\n" if text.strip() else ("# API keys of llmrelay (`llmrelay keys add`): only "
                                       "their hashes are stored here.\n\n")
    lines = [f"{head}[keys.{name}]", f'hash = "{digest(secret)}"']
    if models:
        lines.append("models = [" + ", ".join(f'"{m}"' for m in models) + "]")
    if priority != "interactive":
        lines.append(f'priority = "{priority}"')
    for n in LIMITS:
        if limits.get(n) is not None:
            lines.append(f"{n} = {int(limits[n])}")  # type: ignore[arg-type]
    if admin:
        lines.append("admin = true")
    if metrics_only:
        lines.append("metrics_only = true")
    new = text + ("\n" if text and not text.endswith("\n") else "") + "\n".join(lines) + "\n"
    parse_keys(tomllib.loads(new), str(path))  # never write a file the server would refuse
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new)
    return secret
