"""The Docker driver (aiodocker). See README.md beside this file for its contract."""

from workers.drivers.docker.driver import DockerDriver

__all__ = ["DockerDriver"]
