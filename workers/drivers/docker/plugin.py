"""The `docker` driver's registration: its settings (`SANDFLEET_DOCKER_*`) and factory."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from sandfleet.workers.drivers.base import DriverHost, DriverPlugin, SandboxDriver
from sandfleet.workers.drivers.cdi import ContainerBlock
from sandfleet.workers.drivers.container_settings import ContainerRuntimeSettings


class DockerSettings(ContainerRuntimeSettings):
    model_config = SettingsConfigDict(env_prefix="SANDFLEET_DOCKER_")

    url: str = "unix:///var/run/docker.sock"


def make_docker_driver(settings: DockerSettings, host: DriverHost) -> SandboxDriver[ContainerBlock]:
    from sandfleet.workers.drivers.docker.driver import DockerDriver  # noqa: PLC0415

    return DockerDriver(
        url=settings.url,
        cdi_kind=host.cdi_kind,
        pull_timeout_seconds=settings.pull_timeout_seconds,
        create_timeout_seconds=settings.create_timeout_seconds,
        limits=settings.limits,
    )


plugin = DriverPlugin(
    name="docker",
    summary="containers through the Docker Engine API",
    settings=DockerSettings,
    make=make_docker_driver,
)
