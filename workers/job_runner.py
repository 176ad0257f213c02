"""One job's life on a worker, as a pipeline of named steps:

    decode → validate block → (find or) create → start → wait / timeout → report → clean up

Ack timing: the message is acked only after the terminal event is confirmed and the
sandbox is removed. A worker that dies earlier leaves the message unacked; the
redelivered job finds its sandbox by its deterministic name and adopts it instead of
starting a second one.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common.amqp import EventPublisher
from common.errors import DeadLetter, RequestInvalid, SandboxError
from common.events import Phase
from common.models import Job, field_errors
from common.settings import Settings
from workers.drivers.base import (
    LABEL_JOB_ID,
    LABEL_WORKER_ID,
    SandboxDriver,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    sandbox_name,
)
from workers.reporter import JobReporter, WorkerIdentity

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        driver: SandboxDriver,
        events: EventPublisher,
        identity: WorkerIdentity,
        settings: Settings,
    ) -> None:
        self._driver = driver
        self._events = events
        self._identity = identity
        self._settings = settings
        self.started = 0
        self.finished = 0

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """The job message's handler; `common.amqp.settle` turns its outcome into an ack."""
        job = await self._decode(message)
        report = JobReporter(self._events, self._identity, job.job_id)
        try:
            self._driver.parse_config(job)
        except RequestInvalid as exc:
            await report.emit(Phase.REJECTED, "InvalidDriverConfig", str(exc), errors=exc.errors)
            raise
        self.started += 1
        try:
            await self._run(job, report)
        except SandboxError as exc:
            await report.emit(Phase.FAILED, exc.reason, str(exc))
        except (DeadLetter, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("job %s: unexpected error", job.job_id)
            await report.emit(Phase.FAILED, "WorkerError", f"{type(exc).__name__}: {exc}")
            raise DeadLetter(f"job {job.job_id} failed inside the worker") from exc
        finally:
            self.finished += 1

    async def _decode(self, message: AbstractIncomingMessage) -> Job:
        try:
            return Job.model_validate_json(message.body)
        except ValidationError as exc:
            errors = field_errors(exc, prefix="job")
            report = JobReporter(self._events, self._identity, message.message_id or "unknown")
            await report.emit(Phase.REJECTED, "MalformedJob", "; ".join(map(str, errors)))
            raise RequestInvalid(errors) from exc

    async def _run(self, job: Job, report: JobReporter) -> None:
        sandbox = await self._driver.find(sandbox_name(job.job_id))
        if sandbox is None:
            if job.resource_requirements.gpu_count:
                # GPU claims are not wired into this worker yet: never run a GPU job without
                # its GPU.
                await report.emit(
                    Phase.FAILED,
                    "GpuUnsupported",
                    "this worker cannot claim GPUs yet; the job was not started",
                )
                return
            await report.emit(Phase.STARTING, "Creating", f"creating {sandbox_name(job.job_id)}")
            sandbox = await self._driver.create(self._spec(job))
        else:
            log.info("job %s: adopting existing sandbox %s", job.job_id, sandbox.sandbox_id)
        report.sandbox_id = sandbox.sandbox_id
        try:
            await self._supervise(job, sandbox, report)
        except SandboxError as exc:
            await report.emit(Phase.FAILED, exc.reason, str(exc))
        await self._driver.remove(sandbox.sandbox_id)

    def _spec(self, job: Job) -> SandboxSpec:
        template = job.template
        labels = {
            **job.labels,
            **template.labels,
            LABEL_JOB_ID: job.job_id,
            LABEL_WORKER_ID: self._identity.worker_id,
        }
        return SandboxSpec(
            name=sandbox_name(job.job_id),
            image=template.image,
            command=tuple(template.command),
            environment=template.environment,
            labels=labels,
            cpu=job.resource_requirements.cpu,
            memory_bytes=job.resource_requirements.memory,
        )

    async def _supervise(self, job: Job, sandbox: SandboxState, report: JobReporter) -> None:
        driver = self._driver
        if sandbox.status is SandboxStatus.CREATED:
            await driver.start(sandbox.sandbox_id)
            await report.emit(Phase.RUNNING, "Started")
            started_at = datetime.now(UTC)
        else:
            started_at = sandbox.started_at or datetime.now(UTC)
            if sandbox.status is SandboxStatus.RUNNING:
                await report.emit(Phase.RUNNING, "Adopted", "found running after a redelivery")

        exit_code = sandbox.exit_code
        if sandbox.status is not SandboxStatus.EXITED:
            deadline = _deadline(started_at, job.template.timeout_seconds)
            try:
                async with asyncio.timeout_at(deadline):
                    exit_code = await driver.wait(sandbox.sandbox_id)
            except TimeoutError:
                await driver.stop(
                    sandbox.sandbox_id, grace_seconds=self._settings.stop_grace_seconds
                )
                output = await driver.output(
                    sandbox.sandbox_id, lines=self._settings.output_tail_lines
                )
                message = f"exceeded timeout_seconds={job.template.timeout_seconds}"
                await report.emit(Phase.TIMED_OUT, "Timeout", message, output=output)
                return

        output = await driver.output(sandbox.sandbox_id, lines=self._settings.output_tail_lines)
        if exit_code == 0:
            await report.emit(Phase.SUCCEEDED, "Completed", exit_code=0, output=output)
        else:
            message = f"exited with code {exit_code}"
            await report.emit(
                Phase.FAILED, "NonZeroExit", message, exit_code=exit_code, output=output
            )


def _deadline(started_at: datetime, timeout_seconds: int | None) -> float | None:
    """The loop-clock time at which a sandbox started at `started_at` runs out of time."""
    if timeout_seconds is None:
        return None
    elapsed = (datetime.now(UTC) - started_at).total_seconds()
    return asyncio.get_running_loop().time() + max(0.0, timeout_seconds - elapsed)
