"""One request's way through the gateway, answered with its reply (never sent from here).

    decode → admit (envelope rules) → the job id is the submitter's to use → check the
    route exists → `accepted` event, confirmed → read back as the id's first `accepted`
    in the log (several gateways: `JobIndex.settled`) → sign and publish the job
    (persistent, confirmed, mandatory) → the reply says `accepted`.

The `accepted` event is confirmed before the job is published, so no worker event for
a job can precede it in the event log; the reply says `accepted` only once the broker
has confirmed the job. Many requests go through at once (the gateway's prefetch, a
batch's items): each waits only for its own confirms, which the broker sends for many
publishes together.

Two requests for one job id never both run it: the later waits for the earlier's outcome
(`_in_flight`), then is answered as a duplicate of the job, or admitted anew if the
earlier was rejected. A submission the broker delivers again (its gateway died, or lost
its channel, before the ack) whose job was accepted but is not known to be queued has
its job queued again: nothing accepted is lost. A job confirmed just before such a death
(before its submission's ack reached the broker) is then queued twice: a host's journal
drops the second copy on the same host, but a worker of another host taking it from a
driver's shared queue would run it again (AMQP 0-9-1 has no atomic publish-and-ack).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import PublishError

from sandfleet.common.amqp import (
    JOB_TYPE,
    EventSink,
    json_properties,
    publish_body,
    publish_through_outages,
)
from sandfleet.common.errors import FieldError, MessageUndecodable, RequestInvalid, bounded_errors
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import Job, ReplyStatus, SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.common.signing import JobSigner
from sandfleet.common.topology import job_queue_name, job_routing_key
from sandfleet.gateway.envelope import admit, decode, new_job_id
from sandfleet.gateway.job_index import JobIndex
from sandfleet.gateway.job_signing import JobsSignedTogether
from sandfleet.gateway.ownership import UNIDENTIFIED, Ownership

log = logging.getLogger(__name__)

# Job ids this gateway queued, kept to answer a redelivered submission without queueing
# its job again; a bound on memory (past it, the oldest are forgotten).
MAX_REMEMBERED_QUEUED = 100_000

RouteExists = Callable[[str], Awaitable[bool]]


class Admission:
    """Admits requests one by one or many at once: `await admission.answer(body, …)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobIndex,
        ownership: Ownership,
        events: EventSink,
        job_exchange: AbstractExchange,
        route_exists: RouteExists,
        signer: JobSigner | None,
    ) -> None:
        self._settings = settings
        self._jobs = jobs
        self._ownership = ownership
        self._events = events
        self._job_exchange = job_exchange  # on a channel with confirms, returns raised
        self._route_exists = route_exists
        self._signing = JobsSignedTogether(signer)
        # Accepted, but not queued yet (their publish failed, or their place in the log is
        # not known yet): job id → (job, its `accepted` event's id).
        self._unqueued: dict[str, tuple[Job, str]] = {}
        self._queued: OrderedDict[str, None] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[None]] = {}  # job ids being admitted

    async def answer(
        self, body: bytes, submitter: str | None, *, redelivered: bool, data: Any = None
    ) -> SubmitReply:
        """The reply to one request (`data`: its JSON, decoded already, if it was); its
        `accepted` or `rejected` event is out. Raises only what the broker did (requeue)."""
        try:
            if not submitter:
                raise RequestInvalid([UNIDENTIFIED])
            if data is None:
                data = decode(body, max_bytes=self._settings.max_message_bytes)
            job = admit(body, self._settings)
        except MessageUndecodable as exc:
            error = FieldError(field="request", message=str(exc))
            rejection_id = self._ownership.rejection_id(data, submitter)
            return await self._reject(submitter, rejection_id, [error], "MalformedMessage")
        except RequestInvalid as exc:
            rejection_id = self._ownership.rejection_id(data, submitter)
            return await self._reject(submitter, rejection_id, exc.errors, "InvalidRequest")
        return await self._route(job.model_copy(update={"submitted_by": submitter}), redelivered)

    async def refuse(
        self, submitter: str | None, error: MessageUndecodable | RequestInvalid
    ) -> None:
        """The `rejected` event of a batch refused as a whole, under a fresh id."""
        if isinstance(error, RequestInvalid):
            errors, reason = error.errors, "InvalidBatch"
        else:
            errors, reason = [FieldError(field="request", message=str(error))], "MalformedMessage"
        await self._reject(submitter, new_job_id(), errors, reason)

    async def _route(self, job: Job, redelivered: bool) -> SubmitReply:
        assert job.submitted_by is not None
        while (earlier := self._in_flight.get(job.job_id)) is not None:
            await asyncio.shield(earlier)  # a twin: the earlier one's outcome decides
        if refusal := self._ownership.submit_refusal(job.job_id, job.submitted_by):
            return await self._reject(job.submitted_by, new_job_id(), [refusal], "JobIdTaken")
        phase = self._jobs.existing(job.job_id)
        if phase is not None and not self._to_queue_again(job, phase, redelivered):
            return SubmitReply(
                status=ReplyStatus.ACCEPTED, job_id=job.job_id, duplicate=True, phase=phase
            )
        # No await since the checks: a twin arriving now waits for this one.
        done = asyncio.get_running_loop().create_future()
        self._in_flight[job.job_id] = done
        try:
            if phase is None:
                return await self._accept_and_queue(job)
            # Its acceptance stands: settled first where this gateway made it.
            if (kept := self._unqueued.pop(job.job_id, None)) is not None:
                return await self._settle_then_queue(*kept)
            return await self._queue_or_keep(job, None)
        finally:
            del self._in_flight[job.job_id]
            done.set_result(None)

    def _to_queue_again(self, job: Job, phase: Phase, redelivered: bool) -> bool:
        """Whether an accepted job, submitted again, is to be queued (again)."""
        if job.job_id in self._unqueued:  # this gateway's publish failed
            return True
        # Delivered again: the gateway that had it may have died between the `accepted`
        # event and the job's confirm. Past `accepted`, a worker has it.
        return redelivered and phase is Phase.ACCEPTED and job.job_id not in self._queued

    async def _accept_and_queue(self, job: Job) -> SubmitReply:
        assert job.submitted_by is not None
        self._jobs.reserve(job.job_id, job.submitted_by)
        try:
            event_id = await self._accept(job)
        except RequestInvalid as exc:
            self._jobs.forget(job.job_id)
            return await self._unroutable(job, exc.errors)
        except BaseException:
            self._jobs.forget(job.job_id)
            raise
        return await self._settle_then_queue(job, event_id)

    async def _accept(self, job: Job) -> str:
        """The route exists and the `accepted` event is confirmed (RequestInvalid: no
        route); the event's id."""
        queue = job_queue_name(job.driver, job.placement.host)
        if not await self._route_exists(queue):
            raise RequestInvalid(_unroutable_errors(job))
        event = await self._emit(job, Phase.ACCEPTED, "Accepted", f"queued on {queue}")
        return event.event_id

    async def _settle_then_queue(self, job: Job, event_id: str) -> SubmitReply:
        """Queue `job` if its `accepted` event took the id: the first for it in the log,
        which every gateway reads alike. A twin accepted by another gateway a moment
        before is answered as the duplicate it is (`JobIdTaken` to another submitter)."""
        assert job.submitted_by is not None
        try:
            took = await self._jobs.settled(job.job_id, event_id)
        except BaseException:
            # Its place in the log not read yet (a timeout, a shutdown): not queued but
            # kept, and settled when its submission comes back, never accepted twice.
            self._unqueued[job.job_id] = (job, event_id)
            raise
        if took:
            return await self._queue_or_keep(job, event_id)
        if refusal := self._ownership.submit_refusal(job.job_id, job.submitted_by):
            return await self._reject(job.submitted_by, new_job_id(), [refusal], "JobIdTaken")
        phase = self._jobs.existing(job.job_id) or Phase.ACCEPTED
        return SubmitReply(
            status=ReplyStatus.ACCEPTED, job_id=job.job_id, duplicate=True, phase=phase
        )

    async def _queue_or_keep(self, job: Job, event_id: str | None) -> SubmitReply:
        try:
            await self._queue(job)
        except RequestInvalid as exc:  # unroutable after all: rejected, and the id free again
            self._jobs.forget(job.job_id)
            return await self._unroutable(job, exc.errors)
        except BaseException:
            # Accepted (its event is out) but not queued: kept, and queued when its
            # submission comes back (redelivered, or sent again), never accepted twice.
            if event_id is not None:
                self._unqueued[job.job_id] = (job, event_id)
            raise
        self._queued[job.job_id] = None
        if len(self._queued) > MAX_REMEMBERED_QUEUED:
            self._queued.popitem(last=False)
        return SubmitReply(status=ReplyStatus.ACCEPTED, job_id=job.job_id)

    async def _queue(self, job: Job) -> None:
        body = await self._signing.body(job)
        properties = json_properties(message_id=job.job_id, message_type=JOB_TYPE)
        key = job_routing_key(job.driver, job.placement.host)
        try:
            # Through a lost node too: the connection moves to another and the publish
            # is made again. A copy that did land before is run once (the host journal).
            await publish_through_outages(
                lambda: publish_body(
                    self._job_exchange, body, properties, routing_key=key, mandatory=True
                ),
                what=f"job {job.job_id}",
            )
        except PublishError as exc:
            log.warning("job %s unroutable after acceptance: %s", job.job_id, exc)
            raise RequestInvalid(_unroutable_errors(job)) from exc

    async def _unroutable(self, job: Job, errors: list[FieldError]) -> SubmitReply:
        assert job.submitted_by is not None
        return await self._reject(
            job.submitted_by, job.job_id, errors, "Unroutable", driver=job.driver
        )

    async def _reject(
        self,
        submitter: str | None,
        job_id: str,
        errors: list[FieldError],
        reason: str,
        *,
        driver: str | None = None,
    ) -> SubmitReply:
        errors = bounded_errors(errors)  # a huge request must not make a huge event
        summary = "; ".join(str(e) for e in errors)
        await self._events.publish(
            Event(
                job_id=job_id,
                phase=Phase.REJECTED,
                reason=reason,
                message=summary,
                driver=driver,
                host=self._settings.host,
                submitted_by=submitter,
                errors=errors,
            )
        )
        return SubmitReply(status=ReplyStatus.REJECTED, job_id=job_id, errors=errors)

    async def _emit(self, job: Job, phase: Phase, reason: str, text: str) -> Event:
        event = Event(
            job_id=job.job_id,
            phase=phase,
            reason=reason,
            message=text,
            driver=job.driver,
            host=self._settings.host,
            submitted_by=job.submitted_by,
            labels=job.labels or None,
        )
        await self._events.publish(event)
        return event


def _unroutable_errors(job: Job) -> list[FieldError]:
    if job.placement.host:
        return [
            FieldError(
                field="placement.host",
                message=f"no {job.driver} worker serves host {job.placement.host!r}",
            )
        ]
    return [FieldError(field="driver", message=f"no worker serves driver {job.driver!r}")]
