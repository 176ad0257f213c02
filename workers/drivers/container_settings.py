"""Settings the container drivers (Docker, Podman) have in common.

Shared by the container drivers; it is not a driver itself.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ContainerRuntimeSettings(BaseSettings):
    """A subclass names its runtime's socket (`url`) under its own `SANDFLEET_<NAME>_` prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    url: str
    # One name for both container drivers, as before drivers owned their settings.
    pull_timeout_seconds: float = Field(
        default=300.0, gt=0, validation_alias="SANDFLEET_IMAGE_PULL_TIMEOUT_SECONDS"
    )
