"""One job in a worker's hands, from the moment it is journaled until it is cleaned up.

An `Attempt` owns the state of that one job on this worker: its journal entry, its
sandbox, the GPUs it holds, and why it must stop early (if it must). It builds the
job's events; it publishes nothing and writes nothing itself. It runs the driver's
create as a task of its own, so that a stop request need not wait for an image pull.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandfleet.common.errors import SandboxError
from sandfleet.common.events import Event, GpuPlacement, Phase, bounded_output
from sandfleet.common.models import Job
from sandfleet.common.settings import SandboxPolicy
from sandfleet.workers.drivers.base import DriverConfig, SandboxState, sandbox_name
from sandfleet.workers.gpu.allocator import GpuRequest
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.journal import JournalEntry
from sandfleet.workers.stage_timings import CREATED, CREATING, STARTED, stage_timings


@dataclass(frozen=True)
class JobPlan:
    """What the job asks of this worker: its driver's parsed block and its GPUs."""

    config: DriverConfig
    gpus: GpuRequest


USER_CANCELLED = "Cancelled"

MAX_TIMEOUT_SECONDS = 7 * 86400.0  # SANDFLEET_MAX_TIMEOUT_SECONDS' default


@dataclass(frozen=True)
class StopRequest:
    """Why a job's sandbox is ended early, as its terminal event will say."""

    phase: Phase  # cancelled, or timed_out
    reason: str
    message: str

    @classmethod
    def cancelled(cls, why: str) -> StopRequest:
        """A user's cancellation."""
        return cls(Phase.CANCELLED, USER_CANCELLED, why)

    def outcome(self, output: str | None = None) -> Outcome:
        return Outcome(phase=self.phase, reason=self.reason, message=self.message, output=output)

    def before_start(self) -> Outcome:
        """The outcome for a job stopped before its sandbox existed."""
        reason = "CancelledBeforeStart" if self.reason == USER_CANCELLED else self.reason
        return Outcome(phase=self.phase, reason=reason, message=self.message)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How a job ended: the phase and words of its terminal event."""

    phase: Phase
    reason: str
    message: str = ""
    exit_code: int | None = None
    output: str | None = None

    @classmethod
    def failed(cls, reason: str, message: str, **fields: Any) -> Outcome:
        return cls(phase=Phase.FAILED, reason=reason, message=message, **fields)


class Attempt:
    def __init__(self, entry: JournalEntry, identity: WorkerIdentity, *, plan: JobPlan | None):
        self.entry = entry  # kept as last written to the journal
        self.plan = plan  # None for a job taken over: worked out again when needed
        self.sandbox_id: str | None = entry.sandbox_id
        self.devices: tuple[str, ...] = ()  # the claimed GPUs, as the driver names them
        self.placement: GpuPlacement | None = None  # told in its `claimed` event only
        self.adopted = False  # its sandbox existed already (made by a worker now gone)
        self.warm_pool: str | None = None  # the pool whose ready sandbox it took
        self.stop_request: StopRequest | None = None
        self._creating: asyncio.Task[SandboxState] | None = None  # its driver's, under way
        self._identity = identity

    def mark(self, stage: str, at: datetime | None = None) -> None:
        """Note when the job passed `stage` (a stage_timings mark), unless noted already:
        kept with the entry, and written with its next write."""
        if stage in self.entry.stage_marks:
            return
        marks = {**self.entry.stage_marks, stage: at or datetime.now(UTC)}
        self.entry = self.entry.model_copy(update={"stage_marks": marks})

    def taken_warm(self, pool: str) -> None:
        """It took a ready sandbox of `pool`: made, started, its command running, now."""
        now = datetime.now(UTC)
        for stage in (CREATING, CREATED, STARTED):
            self.mark(stage, now)
        self.warm_pool = pool

    def request_stop(self, request: StopRequest) -> None:
        """End the job early: a create under way (an image pull may take minutes) is
        cancelled, and the job ends before it started."""
        self.stop_request = request
        if self._creating is not None:
            self._creating.cancel()

    async def create_unless_stopped(
        self, create: Callable[[], Coroutine[Any, Any, SandboxState]]
    ) -> SandboxState | StopRequest:
        """The sandbox `create` makes, run as a task that `request_stop` cancels; the
        stop request if it did (or if the create, cut short, failed instead)."""
        if self.stop_request is not None:  # asked before the create began
            return self.stop_request
        self._creating = asyncio.create_task(create())
        try:
            return await self._creating
        except (asyncio.CancelledError, SandboxError):
            # This run itself cancelled (a worker shutting down) is no stop: the job is
            # left to the next worker, as a shutdown leaves every job without a sandbox.
            if self.stop_request is None or _being_cancelled():
                raise
            return self.stop_request
        finally:
            self._creating = None

    @property
    def job(self) -> Job:
        return self.entry.job

    @property
    def job_id(self) -> str:
        return self.entry.job.job_id

    @property
    def sandbox_name(self) -> str:
        return sandbox_name(self.job_id)

    def event(self, phase: Phase, reason: str, message: str = "") -> Event:
        return self._identity.event(
            self.job_id,
            phase,
            reason,
            message=message,
            gpus=list(self.devices),
            sandbox_id=self.sandbox_id,
            submitted_by=self.entry.job.submitted_by,
            placement=self.placement if phase is Phase.CLAIMED else None,
        )

    def terminal_event(self, outcome: Outcome) -> Event:
        return self._identity.event(
            self.job_id,
            outcome.phase,
            outcome.reason,
            message=outcome.message,
            gpus=list(self.devices),
            sandbox_id=self.sandbox_id,
            submitted_by=self.entry.job.submitted_by,
            exit_code=outcome.exit_code,
            output=None if outcome.output is None else bounded_output(outcome.output),
            timings=stage_timings(
                self.entry.stage_marks,
                submitted_at=self.job.submitted_at,
                waiting_since=self.entry.waiting_since,
                ended_at=datetime.now(UTC),
            ),
        )


@dataclass(frozen=True, kw_only=True)
class RunPolicy:
    """The worker's settings that shape a job's life (SANDFLEET_* of the same names)."""

    stop_grace_seconds: float = 5.0
    output_tail_lines: int = 50
    gpu_retry_seconds: float = 10.0
    gpu_max_wait_seconds: float = 3600.0
    takeover: SandboxPolicy = SandboxPolicy.ADOPT
    # The gateway bounds timeout_seconds too; a worker does not count on it.
    max_timeout_seconds: float = MAX_TIMEOUT_SECONDS

    def timeout_refusal(self, timeout_seconds: int | None) -> str | None:
        """Why a job with this timeout must not start here; None if it may."""
        if timeout_seconds is None or timeout_seconds <= self.max_timeout_seconds:
            return None
        return (
            f"template.timeout_seconds: {_shown(timeout_seconds)} is more than this worker's "
            f"maximum, {self.max_timeout_seconds:g} (SANDFLEET_MAX_TIMEOUT_SECONDS)"
        )

    def bounded_timeout(self, timeout_seconds: int | None) -> float | None:
        """The timeout a sandbox is held to: the job's, at most the maximum (a sandbox
        adopted from before the maximum was lowered is held to it as well)."""
        if timeout_seconds is None:
            return None
        return min(timeout_seconds, self.max_timeout_seconds)


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled, not only a task it awaits."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _shown(number: int) -> str:
    # str() of an int of more than 4,300 digits raises; nobody reads one that long anyway.
    return str(number) if number < 10**18 else "a number of more than 18 digits"
