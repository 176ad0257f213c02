"""The `vm` driver's registration: its settings (`SANDFLEET_VM_*`) and factory.

libvirt-python is imported only when a VM driver is made (`pip install 'sandfleet[vm]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sandfleet.workers.drivers.base import DriverHost, DriverPlugin, SandboxDriver
from sandfleet.workers.drivers.vm.config import VmBlock
from sandfleet.workers.drivers.vm.image_files import ImagePolicy

MiB = 2**20
BOOT_TIMEOUT_SECONDS = 120.0


class VmSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SANDFLEET_VM_", frozen=True, extra="ignore", populate_by_name=True
    )

    libvirt_uri: str = Field(
        default="qemu:///system",
        # DESIGN.md's name for it; SANDFLEET_VM_LIBVIRT_URI is read too.
        validation_alias=AliasChoices("SANDFLEET_LIBVIRT_URI", "SANDFLEET_VM_LIBVIRT_URI"),
    )
    # kvm on real hosts; qemu (TCG) where nested KVM guests hang, as on CI machines
    domain_type: str = Field(default="kvm", pattern=r"^(kvm|qemu|test)$")
    work_dir: Path = Path("/var/lib/sandfleet/vm")
    # Where a job's kernel, initrd and base disk may come from (`:`-separated, as PATH).
    image_dirs: Annotated[tuple[Path, ...], NoDecode] = (
        Path("/var/lib/sandfleet/images"),
        Path("/var/lib/sandfleet/guest"),  # what scripts/make-vm-guest builds
    )
    kernel_max_bytes: int = Field(default=64 * MiB, gt=0)
    initrd_max_bytes: int = Field(default=256 * MiB, gt=0)  # the worker reads it whole
    disk_max_bytes: int = Field(default=2**40, gt=0)  # only QEMU reads it, through an overlay
    # How much of the end of a guest's console the worker reads for its exit code and output.
    console_tail_bytes: int = Field(default=256 * 1024, ge=4096, le=64 * MiB)
    # How long a guest may take from its start to its job's start (a cold guest's begin
    # marker) or to waiting for its job (a warm guest's), and a taken warm guest from its
    # job's arrival to its begin marker: past it, the guest failed to boot.
    boot_timeout_seconds: float = Field(default=BOOT_TIMEOUT_SECONDS, gt=0, le=3600)

    @field_validator("image_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(Path(part) for part in value.split(":") if part)
        return value

    @field_validator("image_dirs")
    @classmethod
    def _absolute_dirs(cls, dirs: tuple[Path, ...]) -> tuple[Path, ...]:
        wrong = [str(d) for d in dirs if not d.is_absolute() or d == Path("/")]
        if wrong:
            raise ValueError(f"image directories must be absolute paths, not /: {wrong}")
        return dirs

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            dirs=self.image_dirs,
            kernel_max_bytes=self.kernel_max_bytes,
            initrd_max_bytes=self.initrd_max_bytes,
            disk_max_bytes=self.disk_max_bytes,
        )


def make_vm_driver(settings: VmSettings, host: DriverHost) -> SandboxDriver[VmBlock]:
    try:
        from sandfleet.workers.drivers.vm.driver import VmDriver  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            f"the vm driver needs libvirt-python: pip install 'sandfleet[vm]' ({exc})"
        ) from exc
    return VmDriver(
        uri=settings.libvirt_uri,
        domain_type=settings.domain_type,
        work_dir=settings.work_dir,
        images=settings.image_policy(),
        console_tail_bytes=settings.console_tail_bytes,
        boot_timeout_seconds=settings.boot_timeout_seconds,
    )


plugin = DriverPlugin(
    name="vm",
    summary="virtual machines through libvirt (GPUs as PCI passthrough)",
    settings=VmSettings,
    make=make_vm_driver,
)
