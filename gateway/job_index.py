"""Which job ids the fleet already has, from the event log: submissions are idempotent.

The gateway replays the event log before it takes submissions and follows it live, so
a job_id it (or another gateway) accepted earlier is answered with that job's current
phase instead of being run again. A job whose last word was `rejected` never ran; its
id may be submitted again.
"""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractChannel

from sandfleet.common.events import Phase, event_from_log
from sandfleet.common.stream_follower import LogMessage, StreamFollower
from sandfleet.common.topology import EVENTS_LOG_QUEUE

log = logging.getLogger(__name__)


class JobIndex:
    def __init__(self, channel: AbstractChannel) -> None:
        self._phases: dict[str, Phase] = {}
        self._owners: dict[str, str | None] = {}
        self._follower = StreamFollower(channel, EVENTS_LOG_QUEUE, self._on_message)

    async def start(self) -> None:
        await self._follower.start()

    def existing(self, job_id: str) -> Phase | None:
        """The phase of a job already in the fleet under this id, if any."""
        phase = self._phases.get(job_id)
        return None if phase is Phase.REJECTED else phase

    def known(self, job_id: str) -> bool:
        return job_id in self._phases

    def owner(self, job_id: str) -> str | None:
        """Who first submitted `job_id` (None: unknown, or logged before identities)."""
        return self._owners.get(job_id)

    def reserve(self, job_id: str, owner: str) -> None:
        """Mark `job_id` taken now, before its `accepted` event comes back."""
        self._phases[job_id] = Phase.ACCEPTED
        self._owners.setdefault(job_id, owner)

    def forget(self, job_id: str) -> None:
        self._phases.pop(job_id, None)
        self._owners.pop(job_id, None)

    async def _on_message(self, message: LogMessage, live: bool) -> None:
        event = event_from_log(message.body, message.routing_key)
        if event is None or event.job_id is None or event.phase is Phase.HEARTBEAT:
            return
        if event.submitted_by is not None:
            self._owners.setdefault(event.job_id, event.submitted_by)
        current = self._phases.get(event.job_id)
        if current is not None and current.is_terminal and event.phase is Phase.ACCEPTED:
            return  # a terminal phase is final; a late `accepted` does not reopen it
        self._phases[event.job_id] = event.phase
