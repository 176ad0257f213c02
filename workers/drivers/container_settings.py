"""Settings the container drivers (Docker, Podman) have in common, and the limits every
container they make gets.

Shared by the container drivers; it is not a driver itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sandfleet.common.errors import FieldError
from sandfleet.common.models import ResourceRequirements
from sandfleet.common.quantities import cpu_cores, memory_bytes, size_bytes

# The smallest shares the runtimes take: Docker refuses NanoCpus under 0.01 CPU and
# memory under 6 MiB; a CFS quota under 1 ms per 100 ms period is refused by the kernel.
MIN_CPU = 0.01
MIN_MEMORY = 6 * 2**20

DEFAULT_CPU = 1.0
DEFAULT_MEMORY = 2 * 2**30
DEFAULT_PIDS_LIMIT = 4096
DEFAULT_LOG_MAX_BYTES = 10 * 2**20
DEFAULT_LOG_MAX_FILES = 3
# Every container starts with all capabilities dropped and only these given back: what
# ordinary programs and package managers running as root in an image need (own and
# chmod files, switch users, signal their own processes, bind ports under 1024). Left
# out of Docker's defaults: MKNOD, NET_RAW (forged packets), SYS_CHROOT, AUDIT_WRITE,
# SETFCAP and SETPCAP (granting capabilities).
DEFAULT_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID",
)  # fmt: skip
_CAPABILITY = re.compile(r"[A-Z][A-Z_]*")


def host_cpus() -> float:
    return float(os.cpu_count() or 1)


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _default_memory() -> int:
    return min(DEFAULT_MEMORY, host_memory())


@dataclass(frozen=True, kw_only=True)
class ContainerLimits:
    """What each container gets: cpu and memory (a job's own, else the default, never
    above the maximum), a pids limit, a log size cap, and only `capabilities`."""

    default_cpu: float = DEFAULT_CPU
    max_cpu: float = field(default_factory=host_cpus)
    default_memory: int = field(default_factory=_default_memory)
    max_memory: int = field(default_factory=host_memory)
    pids_limit: int = DEFAULT_PIDS_LIMIT
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    log_max_files: int = DEFAULT_LOG_MAX_FILES
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES

    def cpu(self, asked: float | None) -> float:
        return self.default_cpu if asked is None else asked

    def memory(self, asked: int | None) -> int:
        return self.default_memory if asked is None else asked

    def errors(self, resources: ResourceRequirements) -> list[FieldError]:
        """Why this host cannot give a container `resources`: one error per field."""
        return [
            FieldError(field=f"resource_requirements.{name}", message=message)
            for name, message in (
                ("cpu", self._cpu_error(resources.cpu)),
                ("memory", self._memory_error(resources.memory)),
            )
            if message is not None
        ]

    def _cpu_error(self, cpu: float | None) -> str | None:
        if cpu is None:
            return None
        if not cpu >= MIN_CPU:  # `not >=`: NaN is refused too
            return f"{cpu:g} CPUs is below the smallest share a container can have ({MIN_CPU:g})"
        if cpu > self.max_cpu:
            return (
                f"{cpu:g} CPUs asked; containers on this host get at most {self.max_cpu:g} "
                "(SANDFLEET_CONTAINER_MAX_CPU)"
            )
        return None

    def _memory_error(self, memory: int | None) -> str | None:
        if memory is None:
            return None
        if memory < MIN_MEMORY:
            return f"{memory} bytes is below the {MIN_MEMORY} bytes (6Mi) a container needs"
        if memory > self.max_memory:
            return (
                f"{_bytes(memory)} asked; containers on this host get at most "
                f"{self.max_memory} bytes (SANDFLEET_CONTAINER_MAX_MEMORY)"
            )
        return None


def _bytes(amount: int) -> str:
    # A giant integer quoted whole would make the rejection as large as the request.
    # (and str() of one over 4,300 digits raises): say how big it is instead.
    return f"{amount} bytes" if amount < 10**30 else f"a {amount.bit_length()}-bit number of bytes"


def _capabilities(value: Any) -> Any:
    """ "CHOWN, CAP_KILL" (the environment's form) or a sequence → ("CHOWN", "KILL")."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple):
        return value
    normalised = tuple(str(n).strip().upper().removeprefix("CAP_") for n in names)
    for name in filter(None, normalised):
        if _CAPABILITY.fullmatch(name) is None or name == "ALL":
            raise ValueError(f"{name!r} is not one capability name (e.g. CHOWN or CAP_CHOWN)")
    return tuple(filter(None, normalised))


Cpu = Annotated[float, BeforeValidator(cpu_cores), Field(ge=MIN_CPU)]
Memory = Annotated[int, BeforeValidator(memory_bytes), Field(ge=MIN_MEMORY)]


def _container(name: str) -> str:
    # One name for both container drivers: the same host-wide policy, whichever runs it.
    return f"SANDFLEET_CONTAINER_{name}"


class ContainerRuntimeSettings(BaseSettings):
    """A subclass names its runtime's socket (`url`) under its own `SANDFLEET_<NAME>_` prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    url: str
    # One name for both container drivers, as before drivers owned their settings.
    pull_timeout_seconds: float = Field(
        default=300.0, gt=0, validation_alias="SANDFLEET_IMAGE_PULL_TIMEOUT_SECONDS"
    )
    create_timeout_seconds: float = Field(
        default=60.0, gt=0, validation_alias=_container("CREATE_TIMEOUT_SECONDS")
    )
    default_cpu: Cpu = Field(default=DEFAULT_CPU, validation_alias=_container("DEFAULT_CPU"))
    max_cpu: Cpu = Field(default_factory=host_cpus, validation_alias=_container("MAX_CPU"))
    default_memory: Memory = Field(
        default_factory=_default_memory, validation_alias=_container("DEFAULT_MEMORY")
    )
    max_memory: Memory = Field(
        default_factory=host_memory, validation_alias=_container("MAX_MEMORY")
    )
    pids_limit: int = Field(
        default=DEFAULT_PIDS_LIMIT, gt=0, validation_alias=_container("PIDS_LIMIT")
    )
    log_max_bytes: Annotated[int, BeforeValidator(size_bytes)] = Field(
        default=DEFAULT_LOG_MAX_BYTES, ge=2**10, validation_alias=_container("LOG_MAX_BYTES")
    )
    log_max_files: int = Field(
        default=DEFAULT_LOG_MAX_FILES, ge=1, validation_alias=_container("LOG_MAX_FILES")
    )
    capabilities: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_capabilities)] = Field(
        default=DEFAULT_CAPABILITIES, validation_alias=_container("CAPABILITIES")
    )

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> Self:
        if self.default_cpu > self.max_cpu:
            raise ValueError(f"default_cpu {self.default_cpu:g} is above max_cpu {self.max_cpu:g}")
        if self.default_memory > self.max_memory:
            raise ValueError(
                f"default_memory {self.default_memory} is above max_memory {self.max_memory}"
            )
        return self

    @property
    def limits(self) -> ContainerLimits:
        return ContainerLimits(
            default_cpu=self.default_cpu,
            max_cpu=self.max_cpu,
            default_memory=self.default_memory,
            max_memory=self.max_memory,
            pids_limit=self.pids_limit,
            log_max_bytes=self.log_max_bytes,
            log_max_files=self.log_max_files,
            capabilities=self.capabilities,
        )


# The NVIDIA container runtime (legacy mode, e.g. a host whose default runtime is
# `nvidia`) gives a container the GPUs its environment names here: a job setting
# `NVIDIA_VISIBLE_DEVICES=all` would get every GPU around the claim store. Every
# container is made with it set to `void` (as nvidia-ctk's CDI specs do); claimed GPUs
# reach a container by CDI, or by Docker's `nvidia` device request, which sets it after.
NVIDIA_DEVICES_VARIABLE = "NVIDIA_VISIBLE_DEVICES"


def container_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The job's environment as a container gets it: no GPU by a variable of its own."""
    return {**environment, NVIDIA_DEVICES_VARIABLE: "void"}
