"""One job's life on a worker, as a pipeline of named steps:

    decode → validate block → claim GPUs → create → start → wait / timeout
    → terminal event → release GPUs → remove sandbox → ack

Ownership: a job taken from the driver's shared queue is first bound to this host
(republished to `sandfleet.jobs.<driver>.<host>`, then acked), so whatever happens
next, only workers of this host ever see it again and none elsewhere can start a
second sandbox. From the host queue, the job is claimed its GPUs, written to the
host's journal, and acked at once: no message is held while the sandbox runs (a long
job would outlive the broker's consumer timeout). The journal owns the job until its
sandbox is removed; a worker that dies leaves the entry to the next worker of this
host, which adopts the sandbox (found by its deterministic name) instead of starting
another. GPUs are claimed right before the sandbox is created: a job waiting for GPUs
holds none, and holds no slot either (it is republished with a delay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common.amqp import EventPublisher
from common.errors import (
    DeadLetter,
    RequestInvalid,
    RetryLater,
    SandboxError,
    SandboxNameTaken,
    Unschedulable,
)
from common.events import Event, Phase
from common.models import CancelRequest, Job, field_errors
from common.settings import SandboxPolicy, Settings
from common.topology import RETRY_WAITING_SINCE_HEADER, job_routing_key
from workers.drivers.base import (
    LABEL_GPUS,
    LABEL_JOB_ID,
    LABEL_WORKER_ID,
    DriverConfig,
    SandboxDriver,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    sandbox_name,
)
from workers.gpu.allocator import GpuAllocator, GpuRequest
from workers.gpu.claims import Claim, GpuBusy, NotEnoughGpus
from workers.journal import AlreadyFinished, JobJournal, JournalEntry, OwnedByLiveWorker
from workers.reporter import JobReporter, WorkerIdentity

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        driver: SandboxDriver,
        gpus: GpuAllocator,
        events: EventPublisher,
        identity: WorkerIdentity,
        settings: Settings,
        cancelled: Callable[[str], CancelRequest | None],
        journal: JobJournal,
        bind_to_host: Callable[[AbstractIncomingMessage], Awaitable[None]],
        worker_alive: Callable[[str], bool],
    ) -> None:
        self._driver = driver
        self._gpus = gpus
        self._events = events
        self._identity = identity
        self._settings = settings
        self._cancelled = cancelled  # cancellations known from the control log
        self._journal = journal
        self._bind_to_host = bind_to_host
        self._worker_alive = worker_alive
        # Cancelled while this worker ran them: job id -> (reason code, message).
        self._cancel_reasons: dict[str, tuple[str, str]] = {}
        self._active: dict[str, str] = {}  # job id -> sandbox id, for jobs in hand
        self.started = 0
        self.finished = 0

    @property
    def active_jobs(self) -> list[str]:
        return list(self._active)

    def _cancel_reason(self, job_id: str) -> tuple[str, str] | None:
        if (reason := self._cancel_reasons.get(job_id)) is not None:
            return reason
        request = self._cancelled(job_id)
        return None if request is None else ("Cancelled", request.reason)

    async def cancel(self, job_id: str, message: str, *, reason: str = "Cancelled") -> None:
        """Stop the job's sandbox if this worker runs it; the job then ends `cancelled`
        with `reason` (a reason code) and `message`."""
        self._cancel_reasons[job_id] = (reason, message)
        sandbox_id = self._active.get(job_id)
        if sandbox_id is not None:
            await self._driver.stop(sandbox_id, grace_seconds=self._settings.stop_grace_seconds)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """The job message's handler; `common.amqp.settle` turns its outcome into an ack."""
        job = await self._decode(message)
        report = JobReporter(self._events, self._identity, job.job_id)
        try:
            config, gpu_request = self._validate(job)
        except RequestInvalid as exc:
            await report.emit(Phase.REJECTED, "InvalidDriverConfig", str(exc), errors=exc.errors)
            raise
        except Exception as exc:
            # A block that crashes its driver's parser is poison: it would crash every
            # worker it reached. Say so once and dead-letter it.
            log.exception("job %s: validating its driver block crashed", job.job_id)
            crash = f"validating the {job.driver.value} block crashed: {type(exc).__name__}: {exc}"
            await report.emit(Phase.REJECTED, "DriverConfigCrashed", crash)
            raise DeadLetter(crash) from exc
        if message.routing_key == job_routing_key(job.driver):
            await self._bind_to_host(message)  # then settle acks the shared-queue copy
            return
        try:
            entry = await asyncio.to_thread(
                self._journal.take, job, self._identity.worker_id, self._worker_alive
            )
        except (OwnedByLiveWorker, AlreadyFinished) as exc:
            log.warning(
                "job %s: dropping a duplicate delivery (%s)", job.job_id, type(exc).__name__
            )
            return
        await self._execute(
            job, config, gpu_request, report, entry, _waiting_since(message), message.ack
        )

    async def resume(self, entry: JournalEntry) -> None:
        """Finish a job taken over from a dead worker's journal entry (no message: it
        was acked when the job was journaled)."""
        job = entry.job
        report = JobReporter(self._events, self._identity, job.job_id)
        if entry.terminal is not None:
            # It ended, and may have said so: say it again under the same event_id.
            await self._events.publish(entry.terminal)
            await self._clean_up(job.job_id, entry.sandbox_id)
            return
        config, gpu_request = self._validate(job)

        async def nothing_to_ack() -> None:
            return None

        await self._execute(job, config, gpu_request, report, entry, None, nothing_to_ack)

    async def _execute(
        self,
        job: Job,
        config: DriverConfig,
        gpu_request: GpuRequest,
        report: JobReporter,
        entry: JournalEntry,
        waiting_since: datetime | None,
        ack: Callable[[], Awaitable[object]],
    ) -> None:
        self.started += 1
        report.before_terminal = lambda event: self._record_terminal(job, event)
        try:
            await self._run(job, config, gpu_request, report, entry, waiting_since, ack)
        except SandboxError as exc:
            await report.emit(Phase.FAILED, exc.reason, str(exc))
            await self._clean_up(job.job_id, None)
        except RetryLater:
            await asyncio.to_thread(self._journal.delete, job.job_id)  # not taken on yet
            raise
        except (DeadLetter, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("job %s: unexpected error", job.job_id)
            await report.emit(Phase.FAILED, "WorkerError", f"{type(exc).__name__}: {exc}")
            await self._clean_up(job.job_id, None)
            raise DeadLetter(f"job {job.job_id} failed inside the worker") from exc
        finally:
            self.finished += 1

    def _record_terminal(self, job: Job, event: Event) -> None:
        entry = self._journal.read(job.job_id)
        if entry is not None:
            self._journal.write(entry.model_copy(update={"terminal": event}))

    async def _clean_up(self, job_id: str, sandbox_id: str | None) -> None:
        """After the terminal event: release GPUs, remove the sandbox, close the entry."""
        await self._gpus.release(job_id)
        if sandbox_id is not None:
            await self._driver.remove(sandbox_id)
        entry = await asyncio.to_thread(self._journal.read, job_id)
        if entry is not None:
            await self._journal_write(entry.model_copy(update={"closed": True}))

    async def _decode(self, message: AbstractIncomingMessage) -> Job:
        try:
            return Job.model_validate_json(message.body)
        except ValidationError as exc:
            errors = field_errors(exc, prefix="job")
            report = JobReporter(self._events, self._identity, message.message_id or "unknown")
            await report.emit(Phase.REJECTED, "MalformedJob", "; ".join(map(str, errors)))
            raise RequestInvalid(errors) from exc

    def _validate(self, job: Job) -> tuple[DriverConfig, GpuRequest]:
        config = self._driver.parse_config(job)
        gpus = self._gpus.request(
            config.gpu_device_ids,
            job.resource_requirements.gpu_count,
            path=f"template.driver_config.{job.driver.value}.gpu_device_ids",
            host=self._identity.host,
        )
        return config, gpus

    async def _run(
        self,
        job: Job,
        config: DriverConfig,
        gpus: GpuRequest,
        report: JobReporter,
        entry: JournalEntry,
        waiting_since: datetime | None,
        ack: Callable[[], Awaitable[object]],
    ) -> None:
        sandbox = await self._driver.find(sandbox_name(job.job_id))
        if sandbox is None and entry.sandbox_id is not None:
            # It was created once and is gone now: never start a second one.
            message = f"sandbox {entry.sandbox_id} disappeared while no worker watched it"
            await ack()
            await report.emit(Phase.FAILED, "SandboxLost", message)
            await self._clean_up(job.job_id, None)
            return
        if sandbox is None and (cancelled := self._cancel_reason(job.job_id)):
            await report.emit(Phase.CANCELLED, "CancelledBeforeStart", cancelled[1])
            await self._clean_up(job.job_id, None)
            return
        if sandbox is None:
            claim = await self._claim(job, gpus, report, waiting_since)
            await ack()  # from here on the journal owns the job
            # Any other failure ends in `_execute`: terminal event, GPUs released.
            try:
                sandbox = await self._create(job, config, claim, report)
            except SandboxNameTaken:
                # A dead worker's create of this job landed after we looked: that
                # sandbox is the job's one sandbox (its GPUs are this claim's).
                sandbox = await self._driver.find(sandbox_name(job.job_id))
                if sandbox is None:
                    raise
                log.info("job %s: adopting %s, created late", job.job_id, sandbox.sandbox_id)
                if claim is not None:
                    await self._gpus.attach(job.job_id, sandbox.sandbox_id)
        else:
            log.info("job %s: adopting existing sandbox %s", job.job_id, sandbox.sandbox_id)
            await ack()
            claim = await self._gpus.adopt(job.job_id)
            report.gpus = list(claim.devices) if claim else []
            still_running = sandbox.status is not SandboxStatus.EXITED
            if still_running and self._settings.takeover_policy == SandboxPolicy.STOP:
                self._cancel_reasons[job.job_id] = (
                    "StoppedOnTakeover",
                    f"found {sandbox.status.value} after its worker was gone; "
                    "SANDFLEET_TAKEOVER_POLICY=stop stops such sandboxes",
                )
        await self._journal_write(entry.model_copy(update={"sandbox_id": sandbox.sandbox_id}))
        report.sandbox_id = sandbox.sandbox_id
        self._active[job.job_id] = sandbox.sandbox_id
        try:
            await self._supervise(job, sandbox, report)
        except SandboxError as exc:
            await report.emit(Phase.FAILED, exc.reason, str(exc))
        finally:
            self._active.pop(job.job_id, None)
            self._cancel_reasons.pop(job.job_id, None)
        await self._clean_up(job.job_id, sandbox.sandbox_id)

    async def _journal_write(self, entry: JournalEntry) -> None:
        await asyncio.to_thread(self._journal.write, entry)

    async def _claim(
        self, job: Job, request: GpuRequest, report: JobReporter, waiting_since: datetime | None
    ) -> Claim | None:
        if request.count == 0:
            return None
        host_gpus = len(self._gpus.inventory)
        if request.count > host_gpus:
            raise Unschedulable(
                f"{request.count} GPU(s) wanted; host {self._identity.host} has {host_gpus}"
            )
        try:
            claim = await self._gpus.claim(job.job_id, request)
        except (GpuBusy, NotEnoughGpus) as exc:
            now = datetime.now(UTC)
            since = waiting_since or now
            waited = (now - since).total_seconds()
            if waited >= self._settings.gpu_max_wait_seconds:
                raise Unschedulable(
                    f"no GPUs after waiting {waited:.0f}s "
                    f"(limit {self._settings.gpu_max_wait_seconds:.0f}s): {exc}"
                ) from exc
            await report.emit(Phase.WAITING, "GpusBusy", str(exc))
            raise RetryLater(
                str(exc), delay=self._settings.gpu_retry_seconds, waiting_since=since
            ) from exc
        report.gpus = list(claim.devices)
        await report.emit(Phase.CLAIMED, "GpusClaimed", "physical GPUs " + ", ".join(claim.gpus))
        return claim

    async def _create(
        self, job: Job, config: DriverConfig, claim: Claim | None, report: JobReporter
    ) -> SandboxState:
        await report.emit(Phase.STARTING, "Creating", f"creating {sandbox_name(job.job_id)}")
        sandbox = await self._driver.create(self._spec(job, config, claim))
        if claim is not None:
            await self._gpus.attach(job.job_id, sandbox.sandbox_id)
        return sandbox

    def _spec(self, job: Job, config: DriverConfig, claim: Claim | None) -> SandboxSpec:
        template = job.template
        labels = {
            **job.labels,
            **template.labels,
            LABEL_JOB_ID: job.job_id,
            LABEL_WORKER_ID: self._identity.worker_id,
        }
        if claim is not None:
            labels[LABEL_GPUS] = ",".join(claim.gpus)
        return SandboxSpec(
            name=sandbox_name(job.job_id),
            image=template.image,
            command=tuple(template.command),
            environment=template.environment,
            labels=labels,
            cpu=job.resource_requirements.cpu,
            memory_bytes=job.resource_requirements.memory,
            gpu_devices=claim.devices if claim is not None else (),
            config=config,
        )

    async def _supervise(self, job: Job, sandbox: SandboxState, report: JobReporter) -> None:
        driver = self._driver
        if (cancelled := self._cancel_reason(job.job_id)) is not None:
            if sandbox.status is SandboxStatus.RUNNING:  # adopted, and cancelled meanwhile
                await driver.stop(
                    sandbox.sandbox_id, grace_seconds=self._settings.stop_grace_seconds
                )
            reason, message = cancelled
            await report.emit(Phase.CANCELLED, reason, message, output=await self._output(sandbox))
            return
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
                output = await self._output(sandbox)
                message = f"exceeded timeout_seconds={job.template.timeout_seconds}"
                await report.emit(Phase.TIMED_OUT, "Timeout", message, output=output)
                return

        output = await self._output(sandbox)
        if (cancelled := self._cancel_reason(job.job_id)) is not None:
            reason, message = cancelled
            await report.emit(Phase.CANCELLED, reason, message, output=output)
        elif exit_code is None:
            message = "the sandbox ended without reporting an exit code"
            await report.emit(Phase.FAILED, "NoExitCode", message, output=output)
        elif exit_code == 0:
            await report.emit(Phase.SUCCEEDED, "Completed", exit_code=0, output=output)
        else:
            message = f"exited with code {exit_code}"
            await report.emit(
                Phase.FAILED, "NonZeroExit", message, exit_code=exit_code, output=output
            )

    async def _output(self, sandbox: SandboxState) -> str:
        return await self._driver.output(sandbox.sandbox_id, lines=self._settings.output_tail_lines)


def _waiting_since(message: AbstractIncomingMessage) -> datetime | None:
    value = (message.headers or {}).get(RETRY_WAITING_SINCE_HEADER)
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _deadline(started_at: datetime, timeout_seconds: int | None) -> float | None:
    """The loop-clock time at which a sandbox started at `started_at` runs out of time."""
    if timeout_seconds is None:
        return None
    elapsed = (datetime.now(UTC) - started_at).total_seconds()
    return asyncio.get_running_loop().time() + max(0.0, timeout_seconds - elapsed)
