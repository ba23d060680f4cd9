"""Read what a memory estimate needs from a GGUF file's header: its metadata values (but not its
long arrays, such as the vocabulary, which are skipped) and its tensor count and elements.

Plain Python on the file's bytes, no model library: the host estimates a model before any
process loads it. Format: github.com/ggml-org/ggml/blob/master/docs/gguf.md (version 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
# value type -> struct format (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_MAX_STRING = 1 << 24


class GGUFError(ValueError):
    """Not a GGUF file we can read; the message says what is wrong."""


@dataclass
class GGUFInfo:
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: int = 0
    elements: int = 0  # all tensors' elements together (parameters)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch(self, key: str, default: Any = None) -> Any:
        """`<architecture>.<key>`, e.g. arch("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Reader:
    """Reads the header from a memory map, position by position."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise GGUFError("the file ends inside its header (truncated?)")
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise GGUFError("the file ends inside its header (truncated?)")
        self.pos += n

    def string(self, keep: bool = True) -> str:
        n = self.take("<Q")
        if n > _MAX_STRING:
            raise GGUFError(f"a string of {n} bytes in the header: the file is damaged")
        start = self.pos
        self.skip(n)
        return bytes(self.data[start:self.pos]).decode("utf-8", errors="replace") if keep else ""

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(keep)
        if kind == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            keep = keep and n <= 64  # a long array (the vocabulary): only its length is kept
            if item in _SCALARS:
                if not keep:
                    self.skip(struct.calcsize(_SCALARS[item]) * n)
                    return n
                return [self.take(_SCALARS[item]) for _ in range(n)]
            if item == _STRING and not keep:  # the vocabulary: skipped in a tight loop
                data, pos, unpack = self.data, self.pos, _U64.unpack_from
                for _ in range(n):
                    pos += 8 + unpack(data, pos)[0]
                self.skip(pos - self.pos)
                return n
            values = [self.value(item, keep) for _ in range(n)]
            return values if keep else n
        raise GGUFError(f"unknown metadata value type {kind}: the file is damaged or too new")


def read_info(path: str | Path) -> GGUFInfo:
    """The header of a GGUF file; GGUFError if it is not one (with what is wrong)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(_Reader(data), path)
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror or e}") from e
    except (struct.error, ValueError) as e:
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"{path}: the header is damaged ({e})") from e


def _parse(r: _Reader, path: str | Path) -> GGUFInfo:
    r.skip(4)
    version = r.take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    tensors, kvs = r.take("<Q"), r.take("<Q")
    info = GGUFInfo(tensors=tensors)
    for _ in range(kvs):
        key = r.string()
        info.metadata[key] = r.value(r.take("<I"))
    for _ in range(tensors):
        r.string(keep=False)
        dims = r.take("<I")
        if dims > 8:
            raise GGUFError(f"{path}: a tensor with {dims} dimensions: the file is damaged")
        n = 1
        for _ in range(dims):
            n *= r.take("<Q")
        info.elements += n
        r.skip(12)  # type (u32) and offset (u64)
    return info
