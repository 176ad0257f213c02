"""The `podman` driver's registration: its settings (`SANDFLEET_PODMAN_*`) and factory."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from sandfleet.workers.drivers.base import DriverHost, DriverPlugin, SandboxDriver
from sandfleet.workers.drivers.cdi import ContainerBlock
from sandfleet.workers.drivers.container_settings import ContainerRuntimeSettings


class PodmanSettings(ContainerRuntimeSettings):
    model_config = SettingsConfigDict(env_prefix="SANDFLEET_PODMAN_")

    url: str = "unix:///run/podman/podman.sock"


def make_podman_driver(settings: PodmanSettings, host: DriverHost) -> SandboxDriver[ContainerBlock]:
    from sandfleet.workers.drivers.podman.driver import PodmanDriver  # noqa: PLC0415

    return PodmanDriver(
        url=settings.url,
        cdi_kind=host.cdi_kind,
        pull_timeout_seconds=settings.pull_timeout_seconds,
        create_timeout_seconds=settings.create_timeout_seconds,
        limits=settings.limits,
    )


plugin = DriverPlugin(
    name="podman",
    summary="containers through Podman's libpod API (GPUs as CDI devices)",
    settings=PodmanSettings,
    make=make_podman_driver,
)
