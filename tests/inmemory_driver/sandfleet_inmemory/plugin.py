"""The `inmemory` driver's registration: its settings (`SANDFLEET_INMEMORY_*`) and factory."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sandfleet.workers.drivers.base import DriverHost, DriverPlugin
from sandfleet_inmemory.driver import InMemoryDriver


class InMemorySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SANDFLEET_INMEMORY_", frozen=True, extra="ignore")

    # What a sandbox that is stopped exits with (143: SIGTERM, as a container's shell).
    stop_exit_code: int = Field(default=143, ge=0, le=255)


def make_inmemory_driver(settings: InMemorySettings, host: DriverHost) -> InMemoryDriver:
    return InMemoryDriver(stop_exit_code=settings.stop_exit_code, cdi_kind=host.cdi_kind)


plugin = DriverPlugin(
    name="inmemory",
    summary="sandboxes that live in the worker's memory (for tests)",
    settings=InMemorySettings,
    make=make_inmemory_driver,
)
