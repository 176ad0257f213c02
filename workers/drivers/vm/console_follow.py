"""Following a VM's console log as the guest writes it: the job's output, live.

The console holds the guest's boot messages first; the job's output begins after the
guest's `SANDFLEET_BEGIN` line (see guest.py). virtlogd appends to the file; it is read
from where the last read ended, every `poll_seconds`, until the domain has stopped and
nothing more is left to read.

`wait_for_line` reads it the same way to tell when the guest has printed a marker (its
begin marker: the job's command has started; a warm guest's waiting marker).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sandfleet.workers.drivers.vm.guest import BEGIN_MARKER

POLL_SECONDS = 0.25
# Looking for a marker: how soon after it is printed the driver answers (a job's start).
MARKER_POLL_SECONDS = 0.02
_BEGIN_LINE = BEGIN_MARKER.encode() + b"\n"


def _read_from(path: Path, offset: int) -> tuple[int, bytes]:
    """What the console holds from `offset` on, and where that began: at its start if
    the file is shorter than `offset` (virtlogd rotated it and began a new one)."""
    # No symlinks followed, as everywhere the driver reads a job's directory.
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:  # not written yet
        return offset, b""
    with os.fdopen(descriptor, "rb") as console:
        if os.fstat(console.fileno()).st_size < offset:
            offset = 0
        console.seek(offset)
        return offset, console.read(1 << 20)


class _JobPart:
    """Drops what comes before the begin marker (the boot), in chunks cut anywhere."""

    def __init__(self) -> None:
        self._before = b""
        self.begun = False

    def feed(self, chunk: bytes) -> bytes:
        chunk = chunk.replace(b"\r\n", b"\n")
        if self.begun:
            return chunk
        self._before += chunk
        at = self._before.find(_BEGIN_LINE)
        if at < 0:
            self._before = self._before[-len(_BEGIN_LINE) :]  # the marker may be cut in two
            return b""
        self.begun = True
        return self._before[at + len(_BEGIN_LINE) :]


async def follow_console(
    path: Path, running: Callable[[], Awaitable[bool]], *, poll_seconds: float = POLL_SECONDS
) -> AsyncIterator[bytes]:
    """The job's part of the console log at `path`, until `running()` says it stopped."""
    offset, job_part = 0, _JobPart()
    while True:
        # Asked before reading: a guest that stopped has written all it will.
        still_running = await running()
        while True:
            offset, chunk = await asyncio.to_thread(_read_from, path, offset)
            if not chunk:
                break
            offset += len(chunk)
            if data := job_part.feed(chunk):
                yield data
        if not still_running:
            return
        await asyncio.sleep(poll_seconds)


class _LineSeen:
    """Whether `line` was printed on a line of its own, in chunks cut anywhere."""

    def __init__(self, line: str) -> None:
        self._needle = b"\n" + line.encode() + b"\n"
        self._tail = b"\n"  # the console's very first line counts too

    def feed(self, chunk: bytes) -> bool:
        text = self._tail + chunk
        # Kept as printed (\r\n may be cut in two), long enough to hold a cut marker.
        self._tail = text[-2 * len(self._needle) :]
        return self._needle in text.replace(b"\r\n", b"\n")


async def wait_for_line(
    path: Path,
    line: str,
    stopped: asyncio.Future[Any],
    *,
    poll_seconds: float = MARKER_POLL_SECONDS,
) -> bool:
    """Whether the console log at `path` shows `line` (read from its start) before
    `stopped` is done (the domain stopped: nothing more will be printed)."""
    offset, seen = 0, _LineSeen(line)
    while True:
        ended = stopped.done()  # asked before reading: a stopped guest wrote all it will
        while True:
            offset, chunk = await asyncio.to_thread(_read_from, path, offset)
            if not chunk:
                break
            offset += len(chunk)
            if seen.feed(chunk):
                return True
        if ended:
            return False
        await asyncio.wait({stopped}, timeout=poll_seconds)
