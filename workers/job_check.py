"""Taking a delivered job: decode it and check it against this worker's driver and host.

A job that fails is answered with a `rejected` event (named by every field path the
driver's parser gave) and dead-lettered: it would fail the same way on every worker of
this driver. So is a block that crashes its parser (poison).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aio_pika.abc import HeadersType
from pydantic import ValidationError

from sandfleet.common.amqp import EventSink
from sandfleet.common.errors import (
    MAX_REPORTED_ERRORS,
    DeadLetter,
    FieldError,
    RequestInvalid,
    bounded_errors,
)
from sandfleet.common.events import Phase, bounded_output
from sandfleet.common.models import Job, field_errors
from sandfleet.workers.attempt import JobPlan
from sandfleet.workers.drivers.base import SandboxDriver
from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.identity import WorkerIdentity

log = logging.getLogger(__name__)


class JobMessage(Protocol):
    """The parts of a delivered job message the runner reads (aio-pika's message has them)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> HeadersType: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    async def ack(self, multiple: bool = False) -> None: ...


class JobCheck:
    def __init__(
        self,
        driver: SandboxDriver[Any],
        gpus: GpuAllocator,
        identity: WorkerIdentity,
        events: EventSink,
    ) -> None:
        self._driver = driver
        self._gpus = gpus
        self._identity = identity
        self._events = events

    async def take(self, message: JobMessage) -> tuple[Job, JobPlan]:
        """The job and what it asks of this worker; RequestInvalid or DeadLetter, after
        its `rejected` event, for one that can never run here."""
        job = await self._decode(message)
        try:
            return job, self.plan(job)
        except RequestInvalid as exc:
            await self._reject(
                job.job_id, "InvalidDriverConfig", str(exc), exc.errors, job.submitted_by
            )
            raise
        except Exception as exc:
            # A block that crashes its driver's parser is poison: it would crash every
            # worker it reached. Say so once and dead-letter it.
            log.exception("job %s: validating its driver block crashed", job.job_id)
            crash = f"validating the {job.driver} block crashed: {type(exc).__name__}: {exc}"
            await self._reject(job.job_id, "DriverConfigCrashed", crash, None, job.submitted_by)
            raise DeadLetter(crash) from exc

    async def _decode(self, message: JobMessage) -> Job:
        try:
            return Job.model_validate_json(message.body)
        except ValidationError as exc:
            errors = field_errors(exc, prefix="job", limit=MAX_REPORTED_ERRORS)
            # Not a job, so its claimed id is not to be spoken for: no job_id.
            claimed = (message.message_id or "")[:64]
            summary = "; ".join(map(str, bounded_errors(errors)))
            await self._reject(None, "MalformedJob", f"(claims id {claimed!r}) {summary}")
            raise RequestInvalid(errors) from exc

    def plan(self, job: Job) -> JobPlan:
        """The driver's parsed block and the GPUs asked for; RequestInvalid naming each
        field (a GPU this host lacks: `…gpu_device_ids.<n>`)."""
        config = self._driver.parse_config(job)
        gpus = self._gpus.request(
            config.gpu_device_ids,
            job.resource_requirements.gpu_count,
            path=f"template.driver_config.{job.driver}.gpu_device_ids",
            host=self._identity.host,
            mig_profile=job.resource_requirements.gpu.mig_profile,
        )
        return JobPlan(config=config, gpus=gpus)

    async def _reject(
        self,
        job_id: str | None,
        reason: str,
        message: str,
        errors: list[FieldError] | None = None,
        submitted_by: str | None = None,
    ) -> None:
        bounded = bounded_errors(errors or [])  # a driver may list many, each quoting input
        event = self._identity.event(
            job_id,
            Phase.REJECTED,
            reason,
            message="; ".join(map(str, bounded)) if errors else bounded_output(message),
            errors=bounded,
            submitted_by=submitted_by,
        )
        await self._events.publish(event)
