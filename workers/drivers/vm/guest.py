"""The guest side of a VM job: handing the job to the guest, reading its result back.

The protocol (what `scripts/make-vm-initramfs` builds in): the guest's init runs
`/sandfleet/job.sh` if present, prints `SANDFLEET_BEGIN` before it and
`SANDFLEET_EXIT=<code>` after it on the serial console, then powers off. The driver
appends a small cpio archive holding `/sandfleet/job.sh` to the base initramfs (the
kernel unpacks concatenated archives), so commands of any length and content reach
the guest without passing through the kernel command line.
"""

from __future__ import annotations

import gzip
import re
import shlex
from collections.abc import Mapping, Sequence

BEGIN_MARKER = "SANDFLEET_BEGIN"
_EXIT = re.compile(r"^SANDFLEET_EXIT=(\d+)\s*$", re.MULTILINE)


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


def exit_code(console: str) -> int | None:
    """The guest's exit code from its console log, or None when it never reported one."""
    matches = _EXIT.findall(console.replace("\r", ""))
    return int(matches[-1]) if matches else None


def job_output(console: str, *, lines: int) -> str:
    """The last `lines` lines the job printed (between the markers), else the console's tail."""
    text = console.replace("\r\n", "\n").replace("\r", "\n")
    start = text.rfind(BEGIN_MARKER + "\n")
    if start >= 0:
        text = text[start + len(BEGIN_MARKER) + 1 :]
        exit_at = _EXIT.search(text)
        if exit_at:
            text = text[: exit_at.start()]
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)
