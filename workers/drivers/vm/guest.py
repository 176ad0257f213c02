"""The guest side of a VM job: handing the job to the guest, reading its result back.

The protocol (what `scripts/make-vm-initramfs` builds in): the guest's init runs
`/sandfleet/job.sh` if present, prints `SANDFLEET_BEGIN` before it and
`SANDFLEET_EXIT=<code>` after it on the serial console, then powers off. The driver
appends a small cpio archive holding `/sandfleet/job.sh` to the base initramfs (the
kernel unpacks concatenated archives), so commands of any length and content reach
the guest without passing through the kernel command line.

A warm guest (booted ahead of its job with `sandfleet.wait=1` and no job.sh) prints
`SANDFLEET_WAITING` once it waits on its virtio-serial port `org.sandfleet.job`, and
reads its job from there (`job_frame`); from its begin marker on it is a cold guest.
"""

from __future__ import annotations

import gzip
import re
import shlex
from collections.abc import Mapping, Sequence

BEGIN_MARKER = "SANDFLEET_BEGIN"
WAITING_MARKER = "SANDFLEET_WAITING"
CHANNEL_NAME = "org.sandfleet.job"  # the virtio-serial port a warm guest waits on
WAIT_ARGUMENT = "sandfleet.wait=1"  # on the kernel command line: wait for the job there
# The guest is the job's to run as it likes, so its console is hostile input: an exit
# marker is at most three digits on a line of its own, and counts only as an exit code.
_EXIT = re.compile(r"^SANDFLEET_EXIT=(\d{1,3})[ \t]*$", re.MULTILINE)
MAX_EXIT_CODE = 255


def job_script(command: Sequence[str], environment: Mapping[str, str]) -> str:
    lines = ["#!/bin/sh"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
    lines.append("exec " + " ".join(shlex.quote(arg) for arg in command))
    return "\n".join(lines) + "\n"


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    entry = header + encoded
    entry += b"\0" * (-len(entry) % 4)
    return entry + data + b"\0" * (-len(data) % 4)


def job_archive(command: Sequence[str], environment: Mapping[str, str]) -> bytes:
    """A gzip'd newc cpio archive with /sandfleet/job.sh, to append to an initramfs."""
    script = job_script(command, environment).encode()
    archive = (
        _cpio_entry("sandfleet", 0o040755, b"", 1)
        + _cpio_entry("sandfleet/job.sh", 0o100755, script, 2)
        + _cpio_entry("TRAILER!!!", 0, b"", 0)
    )
    return gzip.compress(archive, mtime=0)


def job_frame(command: Sequence[str], environment: Mapping[str, str]) -> bytes:
    """The job as a warm guest reads it from its channel: the script's length in bytes
    on a line of its own, then the script, so the guest knows where it ends."""
    script = job_script(command, environment).encode()
    return f"{len(script)}\n".encode() + script


def exit_code(console: str) -> int | None:
    """The guest's exit code (0-255) from the last exit marker on its console, or None
    when it reported none. Never raises, whatever the console holds."""
    last = _last_exit_marker(_lines(console))
    if last is None:
        return None
    code = int(last.group(1))
    return code if code <= MAX_EXIT_CODE else None


def job_output(console: str, *, lines: int) -> str:
    """The last `lines` lines the job printed (after the last begin marker, before the
    last exit marker); without markers, the console's last lines."""
    text = _lines(console)
    start = text.rfind(BEGIN_MARKER + "\n")
    if start >= 0:
        text = text[start + len(BEGIN_MARKER) + 1 :]
    exit_at = _last_exit_marker(text)
    if exit_at is not None:
        text = text[: exit_at.start()]
    kept = text.splitlines(keepends=True)[-lines:] if lines > 0 else []
    return "".join(kept)


def _lines(console: str) -> str:
    return console.replace("\r\n", "\n").replace("\r", "\n")


def _last_exit_marker(text: str) -> re.Match[str] | None:
    markers = list(_EXIT.finditer(text))
    return markers[-1] if markers else None
