"""The `vm` block: how the guest boots, and its GPUs by PCI address."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from sandfleet.common.errors import FieldError
from sandfleet.common.models import Job
from sandfleet.workers.drivers.blocks import parse_block
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


def parse_vm_block(job: Job) -> VmBlock:
    errors = []
    if not job.template.image.startswith("/"):
        message = "for the vm driver, the absolute path of the guest kernel on the worker's host"
        errors.append(FieldError(field="template.image", message=message))
    # PCI addresses are compared normalised: 00000000:2d:00.0 and 0000:2d:00.0 are one device.
    return parse_block(VmBlock, job, errors=errors)
