"""Which job ids the fleet already has, from the event log: submissions are idempotent,
and exact across several gateways.

The gateway follows the event log (from its job view's offset: sandfleet.gateway.job_view)
before it takes submissions and live after, so a job_id it (or another gateway) accepted
is answered with that job's current phase instead of being run again. A job whose last
word was `rejected` never ran; its id may be submitted again (by its owner).

What the index answers comes from the view's SQLite file (a point look-up per question),
from the events read but not yet written there, and from this gateway's reservations of
the ids it is accepting: its memory holds no job it is not working on, so neither its
start-up nor its size grows with the log. Ids are forgotten as the view forgets them: an
ended job once its last event is older than the log keeps (SANDFLEET_EVENTS_MAX_AGE); a
live job never.

The cost of the fleet's other traffic: a message under a heartbeat's routing key is
skipped unread (its key names its phase, and a message whose key is not its own event's
counts for nothing: common.event_batches.events_from_log), and the view writes the offset it moves
now and then, not per message. Every other event is read once, for the view.

Several gateways: the log decides. Every gateway reads the same log in the same order
and takes an id's first `accepted` there as the one that took it. A gateway that has
published its `accepted` waits (`settled`) until it reads that event back, and queues the
job only if its event was that first one; a twin accepted elsewhere a moment before
loses, everywhere alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from aio_pika.abc import AbstractChannel

from sandfleet.common.event_batches import events_from_log
from sandfleet.common.events import Event, Phase
from sandfleet.common.stream_follower import LogMessage, StreamFollower
from sandfleet.common.topology import EVENTS_LOG_QUEUE
from sandfleet.gateway.job_rules import counts
from sandfleet.gateway.job_view import JobView
from sandfleet.gateway.view_store import LoggedJob

log = logging.getLogger(__name__)

# The routing keys whose messages the index skips unread (common.topology: a heartbeat's
# key is `heartbeat.<driver>.<host>`).
SKIPPED_KEY_PREFIXES = (f"{Phase.HEARTBEAT.value}.",)
# Long enough for a confirmed `accepted` lost by the stream to come back as its echo
# (common.event_replay: ECHO_AFTER_SECONDS, plus a round of ECHO_EVERY_SECONDS).
SETTLE_TIMEOUT_SECONDS = 60.0
MAX_FREED = 10_000  # ids given up, remembered as free until the log speaks of them again
MAX_BACKLOG = 20_000  # events read but not yet written to the view
# Messages in hand at once: each is taken before the backlog is checked, and a packed
# one holds up to 200 events (common.event_batches), so this bounds what the backlog can
# overshoot by (20,000 events more at most).
PREFETCH = 100


@dataclass(slots=True)
class Reservation:
    """An id this gateway is accepting: taken here before its `accepted` is read back."""

    owner: str
    # `accepted` events read for the id meanwhile: event_id → whether it took the id
    outcomes: dict[str, bool] = field(default_factory=dict)


class JobIndex:
    def __init__(
        self,
        channel: AbstractChannel,
        view: JobView,
        *,
        settle_timeout: float = SETTLE_TIMEOUT_SECONDS,
    ) -> None:
        self._channel = channel
        self._view = view
        self._settle_timeout = settle_timeout
        self._follower: StreamFollower | None = None
        self._reserved: dict[str, Reservation] = {}
        # Read from the log, not yet in the view's file: job id → (offset after, state)
        self._unwritten: dict[str, tuple[int, LoggedJob]] = {}
        self._freed: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, asyncio.Future[bool]] = {}  # event_id → settles
        self.skipped = 0  # messages passed over unread (heartbeats)
        self.read = 0  # messages read as events
        view.written = self._written

    async def start(self) -> None:
        """Read the log from the view's offset (an empty view: from the log's beginning);
        return once caught up with the present."""
        start_at = await self._view.next_offset()
        self._follower = StreamFollower(
            self._channel, EVENTS_LOG_QUEUE, self._on_message, start_at=start_at, prefetch=PREFETCH
        )
        await self._follower.start()

    def existing(self, job_id: str) -> Phase | None:
        """The phase of a job already in the fleet under this id, if any."""
        job = self._current(job_id)
        if job is None or job.phase is Phase.REJECTED:
            return None
        return job.phase

    def known(self, job_id: str) -> bool:
        return self._current(job_id) is not None

    def owner(self, job_id: str) -> str | None:
        """Who first submitted `job_id` (None: unknown, or logged before identities)."""
        job = self._current(job_id)
        return None if job is None else job.owner

    def accepted_by(self, job_id: str) -> str | None:
        """The event_id of the `accepted` that took `job_id`, as read so far."""
        job = self._logged(job_id)
        return None if job is None else job.accepted_event

    def reserve(self, job_id: str, owner: str) -> None:
        """Mark `job_id` taken here now, before its `accepted` event comes back."""
        self._reserved[job_id] = Reservation(owner)

    def forget(self, job_id: str) -> None:
        """Give `job_id` up: a reservation goes; an id this gateway took and has now
        rejected (its `rejected` event already out) is free until the log says more."""
        if self._reserved.pop(job_id, None) is None:
            self._freed[job_id] = None
            if len(self._freed) > MAX_FREED:
                self._freed.popitem(last=False)

    async def settled(self, job_id: str, event_id: str) -> bool:
        """Whether this gateway's `accepted` event `event_id` took `job_id`: the first
        `accepted` for it in the log. Waits until the event is read back; raises
        TimeoutError past the settle timeout (the reservation stays, and with it what
        the log says meanwhile: ask again later)."""
        reservation = self._reserved.get(job_id)
        if reservation is not None and event_id in reservation.outcomes:
            won = reservation.outcomes[event_id]
        elif self.accepted_by(job_id) == event_id:
            won = True  # read before it was reserved: an ask after a timeout
        else:
            waiter = self._waiting.setdefault(event_id, asyncio.get_running_loop().create_future())
            try:
                won = await asyncio.wait_for(asyncio.shield(waiter), self._settle_timeout)
            finally:
                self._waiting.pop(event_id, None)
        self._reserved.pop(job_id, None)  # the log speaks for the id now
        return won

    def _current(self, job_id: str) -> LoggedJob | None:
        reservation = self._reserved.get(job_id)
        if reservation is not None:
            return LoggedJob(Phase.ACCEPTED, reservation.owner, None)
        job = self._logged(job_id)
        if job is not None and job_id in self._freed:
            return LoggedJob(Phase.REJECTED, job.owner, job.accepted_event)
        return job

    def _logged(self, job_id: str) -> LoggedJob | None:
        unwritten = self._unwritten.get(job_id)
        return unwritten[1] if unwritten is not None else self._view.lookup(job_id)

    def _written(self, offset: int) -> None:
        """The view's file holds everything read before `offset`."""
        done = [job_id for job_id, (after, _) in self._unwritten.items() if after <= offset]
        for job_id in done:
            del self._unwritten[job_id]

    async def _on_message(self, message: LogMessage, live: bool) -> None:
        assert self._follower is not None and self._follower.next_offset is not None
        self.take(message, self._follower.next_offset)  # before any await: in log order
        if self._view.backlog > MAX_BACKLOG:
            # Reading a long log faster than the view writes it: its messages are held
            # (unacked) until the view catches up, so memory does not grow with the log.
            await self._view.flushed()

    def take(self, message: LogMessage, offset: int) -> None:
        """Take in `message`, read from the log just before `offset`."""
        if (message.routing_key or "").startswith(SKIPPED_KEY_PREFIXES):
            self.skipped += 1
            self._view.skip(offset)
            return
        self.read += 1
        events = events_from_log(message.body, message.routing_key, message.type)
        self._view.record(events, offset)
        for event in events:
            if event.job_id is not None:
                self._apply(event, event.job_id, offset)

    def _apply(self, event: Event, job_id: str, offset: int) -> None:
        self._freed.pop(job_id, None)
        current = self._logged(job_id)
        took = counts(None if current is None else current.phase, event)
        if took and current is not None and event.event_id == current.accepted_event:
            took = False  # the echo of the `accepted` that took it (the view: seen)
        if took:
            # The submitter the gateway accepted it for owns the id (workers may not
            # publish `accepted`: common.broker_roles); later events only repeat it.
            if current is None:
                job = LoggedJob(event.phase, event.submitted_by, event.event_id)
            elif event.phase is Phase.ACCEPTED:  # freed by a rejection, taken again
                job = LoggedJob(event.phase, current.owner or event.submitted_by, event.event_id)
            else:
                job = LoggedJob(event.phase, current.owner, current.accepted_event)
            self._unwritten[job_id] = (offset, job)
        if event.phase is Phase.ACCEPTED:
            self._settle(job_id, event.event_id, took)

    def _settle(self, job_id: str, event_id: str, took: bool) -> None:
        reservation = self._reserved.get(job_id)
        if reservation is not None:
            reservation.outcomes.setdefault(event_id, took)
        waiter = self._waiting.pop(event_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(took)
