"""Which job ids the fleet already has, from the event log: submissions are idempotent.

The gateway reads the event log before it takes submissions and follows it live, so
a job_id it (or another gateway) accepted earlier is answered with that job's current
phase instead of being run again. It starts from its job view (sandfleet.gateway.job_view):
the ids the view holds, then the log from the view's offset on, not the whole history.
A job whose last word was `rejected` never ran; its id may be submitted again.

The index is bounded like the log it mirrors: a finished job is forgotten once its last
event is older than the log keeps (`SANDFLEET_EVENTS_MAX_AGE`), and past `max_entries`
the oldest finished jobs go first. A live job is never forgotten while a finished one
is left to forget: its id, reused, would start a second sandbox beside the first.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel

from sandfleet.common.events import Phase, event_from_log
from sandfleet.common.stream_follower import LogMessage, StreamFollower
from sandfleet.common.topology import EVENTS_LOG_QUEUE
from sandfleet.gateway.job_rules import counts
from sandfleet.gateway.job_view import JobView

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_SECONDS = 7 * 86400.0  # SANDFLEET_EVENTS_MAX_AGE's default, 7D
# About 250 bytes each (id, record, two dict slots): some 50 MB at the bound.
DEFAULT_MAX_ENTRIES = 200_000


@dataclass(slots=True)
class JobRecord:
    """What the gateway knows of one job id."""

    phase: Phase
    seen_at: float  # wall-clock seconds of the job's latest event, or of its reservation
    owner: str | None = None  # who submitted it, once submissions carry an identity


class JobRecords:
    """Job records by id, bounded by age and count; finished ones are forgotten first.

    Each table is kept in the order records were last written, so the oldest is first.
    """

    def __init__(
        self, *, max_age_seconds: float, max_entries: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._max_age_seconds = max_age_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._live: OrderedDict[str, JobRecord] = OrderedDict()
        self._ended: OrderedDict[str, JobRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live) + len(self._ended)

    def get(self, job_id: str) -> JobRecord | None:
        return self._live.get(job_id) or self._ended.get(job_id)

    def put(self, job_id: str, record: JobRecord) -> None:
        """Record `job_id` as newest in its table, then forget what is over the bounds."""
        self.pop(job_id)
        table = self._ended if record.phase.is_terminal else self._live
        table[job_id] = record
        self._forget_expired()
        self._forget_over_count()

    def pop(self, job_id: str) -> None:
        self._live.pop(job_id, None)
        self._ended.pop(job_id, None)

    def _forget_expired(self) -> None:
        horizon = self._clock() - self._max_age_seconds
        while self._ended and next(iter(self._ended.values())).seen_at < horizon:
            self._ended.popitem(last=False)

    def _forget_over_count(self) -> None:
        while len(self) > self._max_entries:
            (self._ended or self._live).popitem(last=False)


class JobIndex:
    def __init__(
        self,
        channel: AbstractChannel,
        view: JobView | None = None,
        *,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._records = JobRecords(max_age_seconds=max_age_seconds, max_entries=max_entries)
        self._channel = channel
        self._view = view
        self._follower: StreamFollower | None = None

    async def start(self) -> None:
        """Load the view's jobs, then read the log from the view's offset (with no view:
        from its beginning); return once caught up with the present."""
        start_at = None
        if self._view is not None:
            for job in await self._view.ownerships():
                record = JobRecord(phase=job.phase, seen_at=job.updated_at, owner=job.owner)
                self._records.put(job.job_id, record)
            start_at = await self._view.next_offset()
        self._follower = StreamFollower(
            self._channel, EVENTS_LOG_QUEUE, self._on_message, start_at=start_at
        )
        await self._follower.start()

    def existing(self, job_id: str) -> Phase | None:
        """The phase of a job already in the fleet under this id, if any."""
        record = self._records.get(job_id)
        if record is None or record.phase is Phase.REJECTED:
            return None
        return record.phase

    def known(self, job_id: str) -> bool:
        return self._records.get(job_id) is not None

    def owner(self, job_id: str) -> str | None:
        """Who first submitted `job_id` (None: unknown, or logged before identities)."""
        record = self._records.get(job_id)
        return None if record is None else record.owner

    def reserve(self, job_id: str, owner: str) -> None:
        """Mark `job_id` taken now, before its `accepted` event comes back."""
        self._records.put(job_id, JobRecord(phase=Phase.ACCEPTED, seen_at=time.time(), owner=owner))

    def forget(self, job_id: str) -> None:
        self._records.pop(job_id)

    async def _on_message(self, message: LogMessage, live: bool) -> None:
        event = event_from_log(message.body, message.routing_key)
        if self._view is not None and self._follower is not None:
            offset = self._follower.next_offset
            if offset is not None:
                self._view.record(event, offset)
        if event is None or event.job_id is None:
            return
        current = self._records.get(event.job_id)
        if not counts(None if current is None else current.phase, event):
            return
        # The submitter the gateway accepted it for owns the id (workers may not publish
        # `accepted`: common.broker_roles); later events only repeat it.
        owner = current.owner if current is not None else event.submitted_by
        record = JobRecord(phase=event.phase, seen_at=event.timestamp.timestamp(), owner=owner)
        self._records.put(event.job_id, record)
