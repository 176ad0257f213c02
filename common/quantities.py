"""Kubernetes-style resource quantities: "4Gi" of memory, "500m" of CPU."""

from __future__ import annotations

import re

_MEMORY_UNITS = {
    "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?|)\s*$")
_CPU = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m?)\s*$")


def memory_bytes(value: object) -> object:
    """Turn "4Gi" / "512M" / "1048576" into bytes; leave other types for the schema to refuse."""
    if not isinstance(value, str):
        return value
    match = _MEMORY.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a memory quantity (examples: 512Mi, 4Gi, 1G, 1048576)")
    number, unit = match.groups()
    return int(float(number) * _MEMORY_UNITS[unit])


def cpu_cores(value: object) -> object:
    """Turn "500m" / "2" into cores; leave other types for the schema to refuse."""
    if not isinstance(value, str):
        return value
    match = _CPU.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a CPU quantity (examples: 2, 0.5, 500m)")
    number, milli = match.groups()
    return float(number) / (1000 if milli else 1)
