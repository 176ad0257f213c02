"""Docker log entries read with `timestamps=1`: `<RFC 3339 nano time> <text>` each.

The times let a follower that docker let go early (its follow can end at a json-file
rotation when the container exits just after) read the rest once more, from where it
was, without repeating a line.
"""

from __future__ import annotations

from datetime import UTC, datetime

NANOS = 10**9


def split_entry(entry: str) -> tuple[int, str]:
    """(its time in Unix nanoseconds, its text) of one entry; time 0 if it has none."""
    stamp, space, text = entry.partition(" ")
    nanos = _unix_nanos(stamp) if space else None
    return (0, entry) if nanos is None else (nanos, text)


def since_param(unix_nanos: int) -> str:
    """Docker's `since` for a time in Unix nanoseconds (`seconds.nanoseconds`)."""
    return f"{unix_nanos // NANOS}.{unix_nanos % NANOS:09d}"


def _unix_nanos(stamp: str) -> int | None:
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
    digits = fraction[:9].ljust(9, "0")
    return int(seconds) * NANOS + int(digits) if digits.isdigit() else None
