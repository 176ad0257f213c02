"""The files a worker keeps on its host (job journal, GPU claim store, worker leases):
private to the worker's user, and never reached through a planted link.

Each sits in a directory of sandfleet's own (`<journal_dir>/<driver>/`, its `closed/`,
`<state_dir>/gpu/`, `<state_dir>/workers/`) that is 0700 and the worker's, made so when
the worker starts if it was not; each file is 0600 (journal entries carry a job's
environment), whatever the umask. A file is written whole under a fresh name in its
directory (`mkstemp`: O_EXCL, 0600) and renamed over its place, so a reader sees the
old file or the new one and a link at its place is replaced, never written through.
Lock files are opened, and files read, with O_NOFOLLOW: a link there is an error.

`state_dir` and `journal_dir` themselves are made 0700 when sandfleet makes them, and
left as they are when an operator did (they may be shared, like /run).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class UnsafeStatePath(Exception):
    """A state path that is a link, not what it should be, or another user's."""


def private_dir(path: Path) -> Path:
    """`path`, made if missing; a real directory of this user's, now 0700, its files 0600."""
    _make_dirs(path)
    fd = _open_nofollow(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _check_owned(path, fd, directory=True)
    finally:
        os.close(fd)
    _tighten_files(path)
    return path


def _tighten_files(directory: Path) -> None:
    """Make the regular files in `directory` 0600: ones an older version wrote 0644."""
    with os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # pruned meanwhile
                loose = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) & 0o077
                if loose and entry.is_file(follow_symlinks=False):
                    _chmod_nofollow(entry.path)


def _chmod_nofollow(path: str) -> None:
    # Through a descriptor opened without following links: a file swapped for a link
    # since it was looked at is refused (ELOOP), never its target changed.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # gone, or now a link: nothing of ours to tighten
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def open_private(path: Path) -> int:
    """A read-write fd of the regular file `path` (made 0600 if missing), never a link's."""
    fd = _open_nofollow(path, os.O_RDWR | os.O_CREAT)
    try:
        _check_owned(path, fd, directory=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: Path) -> bytes:
    """The contents of the regular file `path`; FileNotFoundError if there is none."""
    # O_NONBLOCK: a FIFO planted there is refused below instead of blocking the open.
    fd = _open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeStatePath(f"{path}: not a regular file")
        return file.read()


def write_private(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace `path` with a 0600 file holding `data`, atomically; `durable`: fsynced,
    and the rename with it, so it survives a power loss."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """Make `path` and its missing parents 0700 (umask can only take bits away)."""
    missing = []
    for directory in (path, *path.parents):
        if os.path.lexists(directory):
            break
        missing.append(directory)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another worker made it meanwhile
            os.mkdir(directory, PRIVATE_DIR_MODE)


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStatePath(f"{path}: a symbolic link, refused") from exc
        if exc.errno == errno.ENOTDIR:
            raise UnsafeStatePath(f"{path}: not a directory") from exc
        raise


def _check_owned(path: Path, fd: int, *, directory: bool) -> None:
    """`fd` (open at `path`) is of the right kind and this user's; it is made private."""
    info = os.fstat(fd)
    kind, is_kind, mode = (
        ("directory", stat.S_ISDIR, PRIVATE_DIR_MODE)
        if directory
        else ("regular file", stat.S_ISREG, PRIVATE_FILE_MODE)
    )
    if not is_kind(info.st_mode):
        raise UnsafeStatePath(f"{path}: not a {kind}")
    if info.st_uid != os.geteuid():
        raise UnsafeStatePath(f"{path}: owned by uid {info.st_uid}, not by this worker's user")
    if stat.S_IMODE(info.st_mode) != mode:
        os.fchmod(fd, mode)
