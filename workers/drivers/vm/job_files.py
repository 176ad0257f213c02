"""A VM job's own files on its host, in `<work_dir>/<domain name>/`.

The job's initramfs carries its environment (secrets, often), so the directory is
private: created afresh, mode 0700, or 0710 with the hypervisor's group where QEMU
runs as its own user (it may pass through to open the files libvirt hands it, and
list or change nothing). Every file in it is 0600, created with `O_EXCL|O_NOFOLLOW`,
never through a link planted in its place. libvirt gives the initramfs and the disk
overlay to the hypervisor's user while the guest runs (its `dynamic_ownership`, on by
default); virtlogd writes the console log (root's, 0600) and rotates it at its
`max_size` (2 MiB by default, `max_backups` 3 kept), so a chatty guest never fills the
disk. The console is read only from its end, a bounded number of bytes.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path

CONSOLE_LOG = "console.log"
INITRD = "initrd.img"
DISK_OVERLAY = "disk.qcow2"
JOB_CHANNEL = "job.sock"  # a warm guest's job channel (libvirt makes the socket)
STARTED_AT = "started_at"
# virtlogd's newest rotated copy of the console log: the tail may begin there.
_ROTATED_CONSOLE_LOG = f"{CONSOLE_LOG}.0"

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def make_private_dir(path: Path, *, hypervisor_group: str | None) -> None:
    """A fresh, empty directory at `path` (anything of an earlier guest there goes)."""
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(path, 0o700)  # FileExistsError if another made it since: never share one
    if hypervisor_group is not None:
        os.chown(path, -1, group_id(hypervisor_group))
        os.chmod(path, 0o710)


def group_id(group: str) -> int:
    """A libvirt DAC group label (`+64055`, or a name) as a group id."""
    if group.startswith("+"):
        return int(group[1:])
    return grp.getgrnam(group).gr_gid


def write_private(path: Path, data: bytes) -> None:
    """A new file at `path`, 0600; FileExistsError if anything (a link included) is there."""
    fd = os.open(path, _CREATE_FLAGS, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def record_started(job_dir: Path) -> None:
    (job_dir / STARTED_AT).unlink(missing_ok=True)
    write_private(job_dir / STARTED_AT, datetime.now(UTC).isoformat().encode())


def started_at(job_dir: Path) -> tuple[bool, datetime | None]:
    """Whether the guest was started, and when (None if that went unrecorded)."""
    try:
        text = _read_end(job_dir / STARTED_AT, 64)
    except OSError:
        return False, None
    try:
        return True, datetime.fromisoformat(text.decode("ascii"))
    except ValueError:  # UnicodeDecodeError included
        return True, None


def console_tail(job_dir: Path, max_bytes: int) -> str:
    """At most the last `max_bytes` of the guest's console, across virtlogd's last
    rotation, from the first whole line; empty if there is none yet."""
    chunks: list[bytes] = []
    wanted = max_bytes
    for name in (CONSOLE_LOG, _ROTATED_CONSOLE_LOG):
        try:
            chunk = _read_end(job_dir / name, wanted)
        except OSError:  # none yet, or not a plain file: nothing to read there
            break
        chunks.insert(0, chunk)
        wanted -= len(chunk)
        if wanted <= 0:
            break
    tail = b"".join(chunks)
    if wanted <= 0 and b"\n" in tail:
        tail = tail[tail.index(b"\n") + 1 :]  # a line cut at the front would mislead
    return tail.decode(errors="replace")


def _read_end(path: Path, max_bytes: int) -> bytes:
    """The last `max_bytes` of a regular file; FileNotFoundError for anything else."""
    fd = os.open(path, _READ_FLAGS)
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise FileNotFoundError(f"{path} is not a regular file")
        file.seek(max(0, status.st_size - max_bytes))
        return file.read(max_bytes)
