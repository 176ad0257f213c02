"""Following a VM's console log as the guest writes it: the job's output, live.

The console holds the guest's boot messages first; the job's output begins after the
guest's `SANDFLEET_BEGIN` line (see guest.py). virtlogd appends to the file; it is read
from where the last read ended, every `poll_seconds`, until the domain has stopped and
nothing more is left to read.

The job's part ends at the guest's exit marker: what follows is its power-off.
`wait_for_line` reads it the same way to tell when the guest has printed a marker (its
begin marker: the job's command has started; a warm guest's waiting marker), and
`wait_for_exit_marker` when the job has ended.
"""

from __future__ import annotations

import asyncio
import os
import re
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


# An exit marker on a line of its own (guest.py's rule): the init's, after the job's
# command ended; what follows is the guest powering off, not the job's.
_EXIT_LINE = re.compile(rb"SANDFLEET_EXIT=[0-9]{1,3}[ \t]*")
_EXIT_PARTIAL = re.compile(rb"SANDFLEET_EXIT=[0-9]{0,3}[ \t]*")
_EXIT_START = b"SANDFLEET_EXIT="


def _may_become_exit_line(partial: bytes) -> bool:
    """Whether an unfinished last line could still turn out to be an exit marker."""
    if len(partial) <= len(_EXIT_START):
        return _EXIT_START.startswith(partial) and partial != b""
    return _EXIT_PARTIAL.fullmatch(partial) is not None


class _JobPart:
    """Keeps what the job printed, in chunks cut anywhere: from after the begin marker
    (before it, the boot) to before the exit marker (after it, the power-off)."""

    def __init__(self) -> None:
        self._before = b""
        self._held = b""  # the job's unfinished last line, while it may be the exit marker
        self._cr = b""
        self.begun = False
        self.ended = False  # the exit marker was seen: the job's output is complete

    def feed(self, chunk: bytes) -> bytes:
        chunk = self._cr + chunk
        # A \r\n cut in two: its \r waits for the next chunk's \n.
        self._cr = b"\r" if chunk.endswith(b"\r") else b""
        chunk = chunk[: len(chunk) - len(self._cr)].replace(b"\r\n", b"\n")
        if self.ended:
            return b""
        if not self.begun:
            self._before += chunk
            at = self._before.find(_BEGIN_LINE)
            if at < 0:
                self._before = self._before[-len(_BEGIN_LINE) :]  # it may be cut in two
                return b""
            self.begun = True
            chunk = self._before[at + len(_BEGIN_LINE) :]
        return self._until_exit_line(chunk)

    def _until_exit_line(self, chunk: bytes) -> bytes:
        *lines, last = (self._held + chunk).split(b"\n")
        kept: list[bytes] = []
        for line in lines:
            if _EXIT_LINE.fullmatch(line):
                self.ended, self._held = True, b""
                return b"".join(kept)
            kept.append(line + b"\n")
        self._held = last if _may_become_exit_line(last) else b""
        return b"".join(kept) + (b"" if self._held else last)

    def rest(self) -> bytes:
        """An unfinished last line held back, once nothing more will be printed."""
        held, self._held, cr, self._cr = self._held, b"", self._cr, b""
        return b"" if self.ended or not self.begun else held + cr


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
            if job_part.ended:
                return
        if not still_running:
            if rest := job_part.rest():
                yield rest
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
    return await _until_seen(path, _LineSeen(line).feed, stopped, poll_seconds)


async def wait_for_exit_marker(
    path: Path, stopped: asyncio.Future[Any], *, poll_seconds: float = MARKER_POLL_SECONDS
) -> bool:
    """Whether the job's exit marker (after its begin marker) is on the console log at
    `path` before `stopped` is done: the job has ended, whatever the guest's power-off
    still takes."""
    job_part = _JobPart()

    def ended(chunk: bytes) -> bool:
        job_part.feed(chunk)
        return job_part.ended

    return await _until_seen(path, ended, stopped, poll_seconds)


async def _until_seen(
    path: Path, seen: Callable[[bytes], bool], stopped: asyncio.Future[Any], poll_seconds: float
) -> bool:
    offset = 0
    while True:
        ended = stopped.done()  # asked before reading: a stopped guest wrote all it will
        while True:
            offset, chunk = await asyncio.to_thread(_read_from, path, offset)
            if not chunk:
                break
            offset += len(chunk)
            if seen(chunk):
                return True
        if ended:
            return False
        await asyncio.wait({stopped}, timeout=poll_seconds)
