"""The `vm` block: how the guest boots, and its GPUs by PCI address.

Its paths are checked here as written (absolute, inside the image directories); the
files themselves are checked on the worker's host when the guest is made (image_files).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from sandfleet.common.errors import FieldError, RequestInvalid
from sandfleet.common.models import Job
from sandfleet.workers.drivers.blocks import parse_block
from sandfleet.workers.drivers.vm.image_files import (
    DISK_FIELD,
    INITRD_FIELD,
    KERNEL_FIELD,
    ImagePolicy,
    outside_dirs_errors,
)
from sandfleet.workers.gpu.inventory import normalize_pci_address


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must be an absolute path on the worker's host")
    if "\x00" in path or "/../" in f"{path}/":
        raise ValueError(f"{path!r} must not contain NUL or '..'")
    return path


HostPath = Annotated[
    str, StringConstraints(min_length=2, max_length=4096), AfterValidator(_absolute)
]
PciAddress = Annotated[str, AfterValidator(normalize_pci_address)]
# Printable ASCII only: it lands in the domain XML and on the guest kernel's command line.
KernelArgs = Annotated[str, StringConstraints(max_length=1024, pattern=r"^[\x20-\x7e]*$")]


class VmBlock(BaseModel):
    """`template.driver_config.vm`. `template.image` is the guest kernel (direct boot)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    initrd: HostPath
    cmdline: KernelArgs = ""
    disk: HostPath | None = Field(
        default=None, description="a base disk image, used through a per-job qcow2 overlay"
    )
    disk_format: Annotated[str, StringConstraints(pattern=r"^(qcow2|raw)$")] = "qcow2"
    gpu_device_ids: list[PciAddress] = Field(default_factory=list, max_length=16)


def parse_vm_block(job: Job, images: ImagePolicy) -> VmBlock:
    """The job's block; RequestInvalid naming every field that is wrong, the kernel's
    path (`template.image`) and every path outside the image directories included."""
    kernel_errors = _kernel_errors(job.template.image, images)
    try:
        # PCI addresses are compared normalised: 00000000:2d:00.0 and 0000:2d:00.0 are one.
        block = parse_block(VmBlock, job)
    except RequestInvalid as exc:
        raise RequestInvalid([*kernel_errors, *exc.errors]) from exc
    paths = {INITRD_FIELD: block.initrd, DISK_FIELD: block.disk}
    found = [*kernel_errors, *outside_dirs_errors(images, paths)]
    if found:
        raise RequestInvalid(found)
    return block


def _kernel_errors(image: str, images: ImagePolicy) -> list[FieldError]:
    try:
        kernel = _absolute(image)
    except ValueError as exc:
        message = f"for the vm driver, the absolute path of the guest kernel on the host: {exc}"
        return [FieldError(field=KERNEL_FIELD, message=message)]
    return outside_dirs_errors(images, {KERNEL_FIELD: kernel})
