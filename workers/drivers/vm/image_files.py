"""The host files a VM job names (its kernel, initrd and base disk), checked before use.

The worker runs as root and a job names these files by path, so a path is only a
request: a file is used only if its real path (every symlink resolved) lies inside
one of the operator's image directories (`SANDFLEET_VM_IMAGE_DIRS`), it is a regular
file (not /proc, a device, a FIFO or a directory), and it is within its size cap. The
check is made on the opened file (`fstat` of the descriptor, opened with
`O_NOFOLLOW`), and what is read is read from that descriptor, so nothing can be
swapped in between. A refusal names the job's field and why, never the file's contents.

Files inside the image directories are the operator's, and trusted as such (a qcow2
base's own backing file is whatever its author made it).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandfleet.common.errors import FieldError, ImageUnavailable

KERNEL_FIELD = "template.image"
INITRD_FIELD = "template.driver_config.vm.initrd"
DISK_FIELD = "template.driver_config.vm.disk"
DIRS_SETTING = "SANDFLEET_VM_IMAGE_DIRS"

# Never follow a final symlink (the path given is resolved first), never block on a
# FIFO, never make a terminal ours.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True, kw_only=True)
class ImagePolicy:
    """Where a job's boot files may come from, and how big each may be."""

    dirs: tuple[Path, ...]
    kernel_max_bytes: int
    initrd_max_bytes: int
    disk_max_bytes: int

    def caps(self) -> Mapping[str, int]:
        return {
            KERNEL_FIELD: self.kernel_max_bytes,
            INITRD_FIELD: self.initrd_max_bytes,
            DISK_FIELD: self.disk_max_bytes,
        }


class ImageRefused(ImageUnavailable):
    """A job's boot file that may not be used; the message starts with its field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {reason}")


def outside_dirs_errors(policy: ImagePolicy, paths: Mapping[str, str | None]) -> list[FieldError]:
    """The fields whose path does not name a place inside the image directories, as
    written (no file is looked at: the real check is `open_image`'s, on the host)."""
    errors = []
    for field, path in paths.items():
        if path is not None and not _inside(Path(os.path.normpath(path)), policy.dirs):
            errors.append(FieldError(field=field, message=_outside_message(policy)))
    return errors


@dataclass(frozen=True)
class ImageFile:
    """A checked boot file: its real path, and a descriptor open on it."""

    path: Path
    fd: int
    size: int


@contextlib.contextmanager
def open_image(policy: ImagePolicy, field: str, path: str) -> Iterator[ImageFile]:
    """The file named by `field`, opened and checked; ImageRefused if it may not be used."""
    real = _real_path(policy, field, path)
    _refuse_special(field, real)  # not opened at all: opening a device can have effects
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise ImageRefused(field, f"cannot be opened ({exc.strerror})") from None
    try:
        size = _checked_size(field, os.fstat(fd), policy.caps()[field])
        yield ImageFile(path=real, fd=fd, size=size)
    finally:
        os.close(fd)


def check_image(policy: ImagePolicy, field: str, path: str) -> Path:
    """The real path of a file the hypervisor opens itself (the kernel, a base disk)."""
    with open_image(policy, field, path) as image:
        return image.path


def read_image(policy: ImagePolicy, field: str, path: str) -> bytes:
    """The whole of a file the worker reads (the base initrd), within its cap."""
    with open_image(policy, field, path) as image, open(image.fd, "rb", closefd=False) as file:
        data = file.read(image.size + 1)
    if len(data) != image.size:  # a file that changed under us, or a pseudo-file
        raise ImageRefused(field, "changed while it was read")
    return data


def _real_path(policy: ImagePolicy, field: str, path: str) -> Path:
    try:
        real = Path(os.path.realpath(path, strict=True))
    except OSError:
        raise ImageRefused(field, f"{path} is not a file on this host") from None
    allowed = [Path(os.path.realpath(d)) for d in policy.dirs]
    if not _inside(real, allowed):
        raise ImageRefused(field, f"{path} resolves outside {_dirs_text(policy)}")
    return real


def _refuse_special(field: str, real: Path) -> None:
    try:
        mode = os.lstat(real).st_mode
    except OSError as exc:
        raise ImageRefused(field, f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ImageRefused(field, "is not a regular file")


def _checked_size(field: str, status: os.stat_result, cap: int) -> int:
    if not stat.S_ISREG(status.st_mode):
        raise ImageRefused(field, "is not a regular file")
    if status.st_size == 0:  # what /proc and /sys files say of themselves
        raise ImageRefused(field, "is empty (or not a plain file)")
    if status.st_size > cap:
        raise ImageRefused(field, f"is {status.st_size} bytes; the cap for it is {cap}")
    return status.st_size


def _inside(path: Path, dirs: Sequence[Path]) -> bool:
    return any(path != d and path.is_relative_to(d) for d in dirs)


def _dirs_text(policy: ImagePolicy) -> str:
    return f"{DIRS_SETTING} ({':'.join(map(str, policy.dirs)) or 'none set'})"


def _outside_message(policy: ImagePolicy) -> str:
    return f"must be a file inside {_dirs_text(policy)}"
