"""The `vm` driver's registration: its settings (`SANDFLEET_VM_*`) and factory.

libvirt-python is imported only when a VM driver is made (`pip install 'sandfleet[vm]'`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sandfleet.workers.drivers.base import DriverHost, DriverPlugin, SandboxDriver
from sandfleet.workers.drivers.vm.config import VmBlock


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


def make_vm_driver(settings: VmSettings, host: DriverHost) -> SandboxDriver[VmBlock]:
    try:
        from sandfleet.workers.drivers.vm.driver import VmDriver  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            f"the vm driver needs libvirt-python: pip install 'sandfleet[vm]' ({exc})"
        ) from exc
    return VmDriver(
        uri=settings.libvirt_uri, domain_type=settings.domain_type, work_dir=settings.work_dir
    )


plugin = DriverPlugin(
    name="vm",
    summary="virtual machines through libvirt (GPUs as PCI passthrough)",
    settings=VmSettings,
    make=make_vm_driver,
)
