"""What a sandbox driver is: the Protocol it implements and the plugin that names it.

The worker runtime owns everything drivers share: events, GPU claims, the journal,
timeouts, cancellation, acks. A driver parses its own config block and drives its
runtime, nothing else. Backend errors are translated into
`sandfleet.common.errors.SandboxError` inside the driver. See README.md beside this
file for the whole contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic_settings import BaseSettings

from sandfleet.common.models import Job
from sandfleet.workers.gpu.inventory import Gpu

LABEL_JOB_ID = "sandfleet.job_id"
LABEL_DRIVER = "sandfleet.driver"
LABEL_WORKER_ID = "sandfleet.worker_id"
LABEL_GPUS = "sandfleet.gpus"
# A warm sandbox's pool profile (set when it is made, before any job is known).
LABEL_POOL = "sandfleet.pool"
# No job's sandbox can have a name starting so: a job id starts with a letter or digit.
WARM_NAME_PREFIX = "sandfleet-_warm-"


def sandbox_name(job_id: str) -> str:
    """Deterministic per job, so a redelivered job finds its sandbox instead of making another."""
    return f"sandfleet-{job_id}"


class DriverConfig(Protocol):
    """A driver's parsed block; the runtime reads only the GPU IDs it names."""

    @property
    def gpu_device_ids(self) -> list[str]: ...


ConfigT = TypeVar("ConfigT", bound=DriverConfig)


@dataclass(frozen=True)
class ClaimedGpu:
    uuid: str  # the physical GPU
    device: str  # the same GPU as this driver names it (a CDI name, a PCI address)


@dataclass(frozen=True, kw_only=True)
class SandboxSpec(Generic[ConfigT]):
    """Everything a runtime needs to create one job's sandbox, in runtime-neutral terms."""

    name: str  # sandbox_name(job_id)
    job_id: str
    worker_id: str
    image: str
    command: tuple[str, ...]
    environment: Mapping[str, str]
    # The job's labels plus sandfleet's own (job id, driver, worker, GPUs): the sandbox
    # carries all of them, so `find` and `list_sandboxes` can say whose it is.
    labels: Mapping[str, str]
    cpu: float | None
    memory_bytes: int | None
    config: ConfigT  # the driver's own parsed block
    gpus: tuple[ClaimedGpu, ...] = ()

    @property
    def gpu_devices(self) -> tuple[str, ...]:
        return tuple(gpu.device for gpu in self.gpus)

    @classmethod
    def for_job(
        cls,
        job: Job,
        config: ConfigT,
        *,
        driver: str,
        worker_id: str,
        gpus: tuple[ClaimedGpu, ...] = (),
    ) -> SandboxSpec[ConfigT]:
        """The sandbox the runtime asks `driver` to create for `job`."""
        template = job.template
        labels = {
            **job.labels,
            **template.labels,
            LABEL_JOB_ID: job.job_id,
            LABEL_DRIVER: driver,
            LABEL_WORKER_ID: worker_id,
        }
        if gpus:
            labels[LABEL_GPUS] = ",".join(gpu.uuid for gpu in gpus)
        return cls(
            name=sandbox_name(job.job_id),
            job_id=job.job_id,
            worker_id=worker_id,
            image=template.image,
            command=tuple(template.command),
            environment=template.environment,
            labels=labels,
            cpu=job.resource_requirements.cpu,
            memory_bytes=job.resource_requirements.memory,
            config=config,
            gpus=gpus,
        )


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
class WarmSpec(Generic[ConfigT]):
    """A sandbox to make ahead of demand for one pool profile: no job is known yet.

    It is made with the profile's image, resources and driver block exactly as a job's
    sandbox matching them would be, so that a job taking it runs as it would cold."""

    name: str  # WARM_NAME_PREFIX + a unique suffix: no job's name
    worker_id: str
    pool: str  # the profile's key (LABEL_POOL)
    image: str
    cpu: float | None
    memory_bytes: int | None
    config: ConfigT
    labels: Mapping[str, str]  # sandfleet's own: driver, worker, pool


@runtime_checkable
class WarmSandboxes(Protocol[ConfigT]):
    """What a driver that can keep warm sandboxes adds to `SandboxDriver` (optional).

    A warm sandbox is listed by `list_sandboxes` with LABEL_POOL among its labels and no
    job id until a job takes it. It serves exactly one job and is then removed."""

    async def create_warm(self, spec: WarmSpec[ConfigT]) -> SandboxState:
        """Create and start a sandbox that waits for its job; it is RUNNING and ready
        to take when this returns. When the worker that made it is gone (its process
        ended), a waiting sandbox ends by itself, or at least never runs a job."""
        ...

    async def take_warm(self, sandbox_id: str, spec: SandboxSpec[ConfigT]) -> SandboxState:
        """Give a waiting sandbox (made by this driver object) `spec`'s job. From the
        first step on, `find(spec.name)` finds it with the job's id; when this returns,
        spec.command is its main process (the job's output and exit code are the
        sandbox's) with spec.environment, and the state says RUNNING.
        SandboxNameTaken if a sandbox of that name exists (it is then not taken);
        SandboxError if it is no longer waiting (the caller removes it)."""
        ...


class SandboxDriver(Protocol[ConfigT]):
    """One sandbox runtime. Every method but `parse_config` and `device_id` talks to it."""

    name: str  # the name jobs use (`"driver": "docker"`), as registered

    def parse_config(self, job: Job) -> ConfigT:
        """Validate the job's inner block strictly; raise RequestInvalid naming each
        error's full path (`template.driver_config.<name>.<key>`)."""
        ...

    def device_id(self, gpu: Gpu) -> str:
        """How this driver names `gpu` to its runtime (a CDI name, a PCI address)."""
        ...

    async def create(self, spec: SandboxSpec[ConfigT]) -> SandboxState:
        """Create (not start) the sandbox named `spec.name`; make its image available
        first. SandboxNameTaken if a sandbox of that name exists already."""
        ...

    async def start(self, sandbox_id: str) -> None: ...

    async def wait(self, sandbox_id: str) -> int:
        """Block until the sandbox exits; return its exit code."""
        ...

    async def stop(self, sandbox_id: str, *, grace_seconds: float) -> None:
        """Ask it to end, and end it after `grace_seconds`; a stopped sandbox is no error."""
        ...

    async def remove(self, sandbox_id: str) -> None:
        """Remove the sandbox (ending it first) and what it owns; one already gone is no error."""
        ...

    async def find(self, name: str) -> SandboxState | None: ...

    async def list_sandboxes(self) -> list[SandboxState]:
        """Every sandbox of this driver that sandfleet made on this host."""
        ...

    async def output(self, sandbox_id: str, *, lines: int) -> str:
        """The last `lines` lines of the sandbox's output, stdout and stderr together."""
        ...

    def follow_output(self, sandbox_id: str) -> AsyncIterator[bytes]:
        """The sandbox's output from its start, as it is printed (stdout and stderr
        interleaved as the runtime keeps them); it ends once the sandbox has exited and
        all of it was read. A started sandbox's; raise SandboxError if there is none."""
        ...

    async def aclose(self) -> None: ...


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


@dataclass(frozen=True, kw_only=True)
class DriverHost:
    """What the worker tells a driver about the host it is made for."""

    cdi_kind: str  # SANDFLEET_CDI_KIND: the vendor/class of the host's GPUs' CDI names


@dataclass(frozen=True, kw_only=True)
class DriverPlugin(Generic[SettingsT]):
    """What a driver package registers under the entry-point group `sandfleet.drivers`.

    `settings` reads the driver's own `SANDFLEET_<NAME>_*` variables; `make` builds the
    driver from them. Keep the module that defines the plugin light: heavy imports (a
    runtime's client library) belong inside `make`, so listing drivers never needs them.
    """

    name: str
    summary: str  # one line, for `sandfleet worker --help`
    settings: type[SettingsT]
    make: Callable[[SettingsT, DriverHost], SandboxDriver[Any]]

    def from_environment(self, host: DriverHost) -> SandboxDriver[Any]:
        """The driver, configured from this process's environment."""
        return self.make(self.settings(), host)
