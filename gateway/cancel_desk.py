"""Cancellation requests: checked against the job's owner, then published, signed.

A submitter never writes to `sandfleet.control` (the broker does not let it): it sends
a CancelRequest to the gateway, like a submission, with its broker-checked AMQP
user_id. Only the job's submitter and the fleet's admins (SANDFLEET_ADMIN_USERS) may
cancel it, and only a job the gateway knows. The answer is a SubmitReply: `accepted`
(the cancellation is on its way to every worker; or, with `phase`, the job had already
ended and nothing was sent) or `rejected` naming why. A refusal is also an event,
under no job id: it must not touch the job it names.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from pydantic import ValidationError

from sandfleet.common.amqp import EventSink, json_message, send_reply
from sandfleet.common.errors import FieldError, RequestInvalid, bounded_errors
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import CancelRequest, ReplyStatus, SubmitReply, field_errors
from sandfleet.common.signing import JobSigner, signed
from sandfleet.common.topology import CANCEL_TYPE
from sandfleet.gateway.ownership import UNIDENTIFIED, Ownership

log = logging.getLogger(__name__)

# A CancelRequest is a job id, a reason of at most 512 characters and a time.
MAX_CANCEL_BYTES = 4096


class CancelDesk:
    def __init__(
        self,
        channel: AbstractChannel,
        control: AbstractExchange,
        events: EventSink,
        ownership: Ownership,
        *,
        signer: JobSigner | None,
        host: str,
    ) -> None:
        self._channel = channel
        self._control = control
        self._events = events
        self._ownership = ownership
        self._signer = signer
        self._host = host

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Answer one cancellation request; RequestInvalid (dead-lettered) if malformed."""
        requester = message.user_id
        request = await self._decode(message)
        if not requester:
            refusal: FieldError | None = UNIDENTIFIED
        else:
            refusal = self._ownership.cancel_refusal(request.job_id, requester)
        if refusal is not None:
            await self._refuse(message, request.job_id, refusal)
            return
        if (ended := self._ownership.ended(request.job_id)) is not None:
            # Nothing to stop; and no cancellation for workers to keep (a flood of them for
            # one's own finished jobs must not push others' out of the workers' tables).
            reply = SubmitReply(status=ReplyStatus.ACCEPTED, job_id=request.job_id, phase=ended)
            await send_reply(self._channel, message, reply)
            return
        approved = CancelRequest(
            job_id=request.job_id,
            reason=request.reason,
            requested_at=datetime.now(UTC),
            requested_by=requester,
        )
        await self._control.publish(
            json_message(signed(approved, self._signer), type=CANCEL_TYPE), routing_key=""
        )
        log.info("job %s: cancellation by %s sent to the workers", request.job_id, requester)
        reply = SubmitReply(status=ReplyStatus.ACCEPTED, job_id=request.job_id)
        await send_reply(self._channel, message, reply)

    async def _decode(self, message: AbstractIncomingMessage) -> CancelRequest:
        try:
            if len(message.body) > MAX_CANCEL_BYTES:
                size = f"{len(message.body)} bytes; the limit is {MAX_CANCEL_BYTES}"
                raise RequestInvalid([FieldError(field="request", message=size)])
            return CancelRequest.model_validate_json(message.body)
        except (ValidationError, RequestInvalid) as exc:
            errors = exc.errors if isinstance(exc, RequestInvalid) else field_errors(exc)
            await self._refuse(message, "", *bounded_errors(errors))
            raise RequestInvalid(errors) from None

    async def _refuse(
        self, message: AbstractIncomingMessage, job_id: str, *errors: FieldError
    ) -> None:
        summary = "; ".join(map(str, errors))
        log.info("refused a cancellation by %r: %s", message.user_id, summary)
        await self._events.publish(
            Event(
                job_id=None,
                phase=Phase.REJECTED,
                reason="CancelRefused",
                message=f"cancellation of {job_id!r} refused: {summary}",
                host=self._host,
                submitted_by=message.user_id,
                errors=list(errors),
            )
        )
        reply = SubmitReply(status=ReplyStatus.REJECTED, job_id=job_id, errors=list(errors))
        await send_reply(self._channel, message, reply)
