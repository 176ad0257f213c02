"""Parsing the RFC 3339 timestamps container runtimes report."""

from __future__ import annotations

import re
from datetime import datetime

_FRACTION = re.compile(r"\.(\d+)")


def parse_runtime_time(value: str | None) -> datetime | None:
    """Docker/Podman times carry nanoseconds and Go's zero time for "never"."""
    if not value or value.startswith("0001-01-01"):
        return None
    value = value.replace("Z", "+00:00")
    value = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), value, count=1)
    return datetime.fromisoformat(value)
