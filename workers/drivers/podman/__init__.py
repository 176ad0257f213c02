"""The Podman driver (libpod REST API). See README.md beside this file for its contract."""

from workers.drivers.podman.driver import PodmanDriver

__all__ = ["PodmanDriver"]
