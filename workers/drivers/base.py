"""The narrow interface every sandbox driver implements.

The worker runtime owns everything drivers share: events, timeouts, acks, claims.
A driver only parses its own config block and drives its runtime. Backend errors
are translated into `common.errors.SandboxError` inside the driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from common.models import Driver, Job
from workers.gpu.inventory import Gpu

LABEL_JOB_ID = "sandfleet.job_id"
LABEL_DRIVER = "sandfleet.driver"
LABEL_WORKER_ID = "sandfleet.worker_id"
LABEL_GPUS = "sandfleet.gpus"


def sandbox_name(job_id: str) -> str:
    """Deterministic per job, so a redelivered job finds its sandbox instead of making another."""
    return f"sandfleet-{job_id}"


class DriverConfig(Protocol):
    """A driver's parsed block; the runtime only needs the GPU IDs it asks for."""

    @property
    def gpu_device_ids(self) -> list[str]: ...


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    """Everything a runtime needs to create one sandbox, in runtime-neutral terms."""

    name: str
    image: str
    command: tuple[str, ...]
    environment: Mapping[str, str]
    labels: Mapping[str, str]
    cpu: float | None
    memory_bytes: int | None
    gpu_devices: tuple[str, ...] = ()  # driver-native IDs of the claimed GPUs
    config: DriverConfig | None = None  # the driver's own parsed block


class SandboxStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True, kw_only=True)
class SandboxState:
    sandbox_id: str
    name: str
    status: SandboxStatus
    exit_code: int | None
    started_at: datetime | None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def job_id(self) -> str | None:
        return self.labels.get(LABEL_JOB_ID)


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    gpus: bool
    gpu_detail: str = ""


class SandboxDriver(Protocol):
    kind: Driver

    def parse_config(self, job: Job) -> DriverConfig:
        """Validate the job's inner block strictly; raise RequestInvalid with full field paths."""
        ...

    def device_id(self, gpu: Gpu) -> str:
        """How this driver names `gpu` to its runtime (a CDI name, a PCI address)."""
        ...

    async def capabilities(self) -> Capabilities: ...

    async def create(self, spec: SandboxSpec) -> SandboxState:
        """Create (not start) the sandbox; make the image available first."""
        ...

    async def start(self, sandbox_id: str) -> None: ...

    async def wait(self, sandbox_id: str) -> int:
        """Block until the sandbox exits; return its exit code."""
        ...

    async def stop(self, sandbox_id: str, *, grace_seconds: float) -> None: ...

    async def remove(self, sandbox_id: str) -> None:
        """Remove the sandbox and what it owns; a sandbox already gone is not an error."""
        ...

    async def find(self, name: str) -> SandboxState | None: ...

    async def list_sandboxes(self) -> list[SandboxState]:
        """Every sandbox this driver's runtime holds that sandfleet made."""
        ...

    async def output(self, sandbox_id: str, *, lines: int) -> str:
        """The last `lines` lines of the sandbox's output, stdout and stderr together."""
        ...

    async def aclose(self) -> None: ...
