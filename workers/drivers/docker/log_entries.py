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


def split_entries(chunk: str) -> list[tuple[int, str]]:
    """Each entry of a chunk of docker's log stream, with its time: a chunk may hold
    several (one line each, each with its own time), and the time of the last one read
    is where a follower that docker let go early reads on from."""
    pieces = chunk.split("\n")
    entries = [piece + "\n" for piece in pieces[:-1]]
    if pieces[-1]:
        entries.append(pieces[-1])  # an entry docker logged without a newline
    return [split_entry(entry) for entry in entries]


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
