"""Sizes and durations as operators write them: `12GiB`, `800MiB`, `0.8` (a fraction of what is
free), `10m`, `90s`, `1h30m`, `-1` (forever)."""

from __future__ import annotations

import re

GiB = 1024**3
MiB = 1024**2
_UNITS = {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024**4}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_bytes(text: str | int | float) -> int:
    """`12GiB`, `12GB` (read as GiB: memory is counted in binary units), `800M`, `1073741824`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 12GiB, 800MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_budget(text: str | int | float) -> tuple[int | None, float | None]:
    """`--max-memory`: (bytes, None) for a size; (None, fraction) for a number up to 1 or a
    percentage (`0.8`, `80%`: that share of the memory free when a load is planned)."""
    s = str(text).strip()
    share = s[:-1] if s.endswith("%") else s
    try:
        value = float(share) / (100 if s.endswith("%") else 1)
    except ValueError:
        return parse_bytes(s), None
    if s.endswith("%") or value <= 1:
        if not 0 < value <= 1:
            raise ValueError(f"--max-memory {s}: a share of free memory must be above 0 and at "
                             "most 1 (100%)")
        return None, value
    return int(value), None


def parse_duration(text: str | int | float | None) -> float | None:
    """Seconds: `10m`, `90s`, `1h30m`, a bare number (seconds). None, `""`, `-1`, `never` or
    `forever`: no limit (None). `0` is zero: at once."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return None if text < 0 else float(text)
    s = str(text).strip().lower()
    if s in ("", "never", "forever", "none") or s.startswith("-"):
        return None
    try:
        return float(s)
    except ValueError:
        pass
    total, end = 0.0, 0
    for m in _DURATION.finditer(s):
        if s[end:m.start()].strip():
            break
        total += float(m.group(1)) * _SECONDS[m.group(2)]
        end = m.end()
    if end == 0 or s[end:].strip():
        raise ValueError(f"{text!r} is not a duration; write e.g. 10m, 90s, 1h30m or -1 (never)")
    return total


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if abs(n) >= size or unit == "MiB":
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.0f} MiB"
    return f"{n:.0f} B"


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "never"
    if s >= 3600 and s % 3600 == 0:
        return f"{s / 3600:g}h"
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:g}m"
    return f"{s:g}s"
