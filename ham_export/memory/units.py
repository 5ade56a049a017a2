"""Byte sizes with units, read and written: ``512MiB``, ``4 GiB``, ``1.5GB``, ``2048`` (bytes)."""

from __future__ import annotations

import math
import re

from ..errors import InputError

UNITS = {
    "b": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
MAX_BYTES = 1 << 60  # an exbibyte: anything larger is a typo, not a budget


def parse_size(text: str, what: str = "size") -> int:
    """``text`` in bytes (rounded down). Units: B, KiB, MiB, GiB, TiB (powers of 1024), KB, MB, GB, TB (powers of
    1000), K/M/G/T (as KiB/MiB/GiB/TiB); none means bytes. Zero, negative and absurd sizes are refused."""
    match = _SIZE.match(str(text))
    if not match:
        raise InputError(f"{what} must be a number with an optional unit ({', '.join(_unit_names())}), "
                         f"got {text!r}")
    number, unit = match.groups()
    factor = UNITS.get(unit.lower() if unit else "b")
    if factor is None:
        raise InputError(f"unknown unit {unit!r} in {what} {text!r}; use one of {', '.join(_unit_names())}")
    value = float(number) * factor
    if not math.isfinite(value) or value >= MAX_BYTES:
        raise InputError(f"{what} {text!r} is larger than {format_size(MAX_BYTES)}; check the unit")
    if int(value) <= 0:
        raise InputError(f"{what} must be at least 1 byte, got {text!r}")
    return int(value)


def _unit_names() -> list[str]:
    return ["B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"]


def format_size(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at least 1: ``3.43 MiB``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{sign}{n / factor:.2f} {unit}"
    return f"{sign}{int(n)} B"
