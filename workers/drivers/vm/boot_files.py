"""A guest's boot files: checked (image_files.py), then made in its private directory.

The kernel and a base disk are the operator's files, used in place (a disk through a
copy-on-write overlay of the guest's own); the initramfs is copied into the guest's
directory, with its job appended when the job is known at boot (a cold guest), since
libvirt hands each file it is given to the hypervisor's user while the guest runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NamedTuple

from sandfleet.common.errors import SandboxError
from sandfleet.workers.drivers.vm.config import VmBlock
from sandfleet.workers.drivers.vm.image_files import (
    DISK_FIELD,
    INITRD_FIELD,
    KERNEL_FIELD,
    ImagePolicy,
    check_image,
    read_image,
)
from sandfleet.workers.drivers.vm.job_files import (
    DISK_OVERLAY,
    INITRD,
    make_private_dir,
    write_private,
)


class BootFiles(NamedTuple):
    kernel: Path  # the checked file's real path
    initrd: Path  # the guest's own initramfs
    disk: Path | None  # the guest's own overlay of the checked base disk


class _CheckedFiles(NamedTuple):
    kernel: Path
    initrd: Path
    base_disk: Path | None


async def make_boot_files(
    images: ImagePolicy,
    kernel: str,
    block: VmBlock,
    *,
    job: bytes,
    work: Path,
    hypervisor_group: str | None,
) -> BootFiles:
    """Check every boot file (ImageRefused naming its field), then make the guest's own
    in a fresh private `work` directory: its initramfs (the base, then `job`), its disk
    overlay."""
    try:
        checked = await asyncio.to_thread(
            _prepare, images, kernel, block, job, work, hypervisor_group
        )
    except OSError as exc:
        raise SandboxError(f"preparing the guest's files in {work}: {exc}") from exc
    disk = None
    if checked.base_disk is not None:
        disk = await _overlay(work, checked.base_disk, block.disk_format)
    return BootFiles(kernel=checked.kernel, initrd=checked.initrd, disk=disk)


def _prepare(
    images: ImagePolicy,
    kernel: str,
    block: VmBlock,
    job: bytes,
    work: Path,
    hypervisor_group: str | None,
) -> _CheckedFiles:
    kernel_path = check_image(images, KERNEL_FIELD, kernel)
    disk = check_image(images, DISK_FIELD, block.disk) if block.disk else None
    base_initrd = read_image(images, INITRD_FIELD, block.initrd)
    make_private_dir(work, hypervisor_group=hypervisor_group)
    write_private(work / INITRD, base_initrd + job)
    return _CheckedFiles(kernel=kernel_path, initrd=work / INITRD, base_disk=disk)


async def _overlay(work: Path, base: Path, base_format: str) -> Path:
    """A copy-on-write overlay of the checked base, so the base is never written."""
    overlay = work / DISK_OVERLAY
    process = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format,
        "-b", str(base), str(overlay),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        umask=0o077,  # the overlay holds what the guest writes: 0600, as the job's own
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise SandboxError(f"qemu-img create overlay of {base}: {out.decode().strip()}")
    return overlay
