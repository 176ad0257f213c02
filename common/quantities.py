"""Kubernetes-style resource quantities: "4Gi" of memory, "500m" of CPU, and their bounds.

Quantities are parsed exactly (Decimal, never float), so no spelling of a number, however
long, overflows or rounds into another: a quantity is either in range or refused.
"""

from __future__ import annotations

import math
import re
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal

_MEMORY_UNITS = {
    "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip
# ASCII only: `\d` would take other scripts' digits, which Decimal reads as numbers too.
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKMGT]i?|)\s*", re.ASCII)
_CPU = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(m?)\s*", re.ASCII)

# Docker refuses a memory limit under 6 MiB; 16 TiB is beyond any one host sandfleet runs on.
MIN_MEMORY_BYTES = 6 * 2**20
MAX_MEMORY_BYTES = 16 * 2**40
# 10m: below that a CPU quota rounds to nothing (a runtime reads 0 as "unlimited").
MIN_CPU_CORES = 0.01
MAX_CPU_CORES = 1024.0

# Enough precision to be exact wherever a bound is decided, and exponents wide enough that
# no string of digits (a message is at most a few MiB) overflows the arithmetic.
_EXACT = Context(prec=64, Emax=MAX_EMAX, Emin=MIN_EMIN)
_MIN_CORES, _MAX_CORES = Decimal(str(MIN_CPU_CORES)), Decimal(str(MAX_CPU_CORES))

_MEMORY_RANGE = f"between 6Mi and 16Ti ({MIN_MEMORY_BYTES} to {MAX_MEMORY_BYTES} bytes)"
_CPU_RANGE = f"between {MIN_CPU_CORES} (10m) and {MAX_CPU_CORES:g} cores"


def memory_bytes(value: object) -> object:
    """Turn "4Gi" / "512M" / "8388608" into bytes, refusing any outside the bounds (so no
    spelling builds a giant number); leave other types for the schema to refuse."""
    return _bytes(value, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES, "memory", _MEMORY_RANGE)


def size_bytes(value: object) -> object:
    """A size that is not memory (a log cap): "10Mi" / "1M" / "4096", 1 byte to 16 TiB."""
    return _bytes(value, 1, MAX_MEMORY_BYTES, "size", "between 1 byte and 16Ti")


def _bytes(value: object, low: int, high: int, what: str, range_text: str) -> object:
    if not isinstance(value, str):
        return value
    match = _MEMORY.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{_shown(value)} is not a {what} quantity (examples: 512Mi, 4Gi, 1G, 8388608)"
        )
    number, unit = match.groups()
    amount = _EXACT.multiply(Decimal(number), _MEMORY_UNITS[unit])
    if not low <= amount <= high:
        raise ValueError(f"{_shown(value)} is out of range: {what} must be {range_text}")
    return int(amount)


def cpu_cores(value: object) -> object:
    """Turn "500m" / "2" into cores, refusing any outside the bounds; leave other types
    for the schema to refuse."""
    if not isinstance(value, str):
        return value
    match = _CPU.fullmatch(value)
    if match is None:
        raise ValueError(f"{_shown(value)} is not a CPU quantity (examples: 2, 0.5, 500m)")
    number, milli = match.groups()
    cores = _EXACT.divide(Decimal(number), 1000 if milli else 1)
    if not _MIN_CORES <= cores <= _MAX_CORES:
        raise ValueError(f"{_shown(value)} is out of range: cpu must be {_CPU_RANGE}")
    return float(cores)


def memory_in_range(value: int) -> int:
    """A byte count the runtimes can honour (6 MiB to 16 TiB)."""
    if not MIN_MEMORY_BYTES <= value <= MAX_MEMORY_BYTES:
        raise ValueError(f"must be {_MEMORY_RANGE}")
    return value


def cpu_in_range(value: float) -> float:
    """A core count the runtimes can honour (0.01 to 1024); NaN and infinities are not."""
    # Written so that NaN, which compares false with everything, is refused too.
    if not (math.isfinite(value) and MIN_CPU_CORES <= value <= MAX_CPU_CORES):
        raise ValueError(f"must be {_CPU_RANGE}")
    return value


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted for a message, cut short: a request may send a megabyte of digits."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"
