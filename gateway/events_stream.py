"""Reading the event log: live, or replayed from its start, filtered by job, driver,
host and phase.

Jobs' events are in `sandfleet.events.log`, workers' heartbeats in
`sandfleet.heartbeats.log` (common.topology); a reader reads the one its filter needs,
or both (`EventFilter.logs`).

A reader declares nothing. It finds a log with a passive declare, which RabbitMQ
3.10 allows with no permission at all (tests/integration/test_client.py measures it),
and needs read permission on the log to consume it and write permission on
`sandfleet.events` for routing keys `log-marker.*` to mark where the history ends (one
marker lands in both logs).

An event counts only if it came under its own routing key (`<phase>.<driver>.<host>`):
the broker's topic authorisation lets a worker publish only its own host's keys, so an
event that claims another host (or a submitter's marker dressed as an event) is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection
from datetime import datetime
from functools import partial
from typing import Any, Self

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelNotFoundEntity

from sandfleet.common.channel_lifecycle import close_whole, set_up_whole
from sandfleet.common.cluster_start import start_when_cluster_ready
from sandfleet.common.errors import FleetUnreachable
from sandfleet.common.event_batches import events_from_log
from sandfleet.common.events import JOB_PHASES, Event, Phase
from sandfleet.common.lifecycle import AsyncCloseable
from sandfleet.common.stream_follower import is_log_marker, publish_log_marker
from sandfleet.common.topology import EVENTS_LOG_QUEUE, HEARTBEATS_LOG_QUEUE

log = logging.getLogger(__name__)

_SEEN_EVENTS = 100_000  # event ids remembered per stream, to drop repeats


class EventFilter:
    """Which events a reader wants; an empty criterion matches everything."""

    def __init__(
        self,
        *,
        job_id: str | None = None,
        driver: str | None = None,
        host: str | None = None,
        phases: Collection[Phase] = (),
    ) -> None:
        self.job_id, self.driver, self.host, self.phases = job_id, driver, host, frozenset(phases)

    def logs(self) -> tuple[str, ...]:
        """The logs whose events can match: heartbeats (no job's) only in theirs."""
        phases = self.phases or frozenset(Phase)
        logs = []
        if phases & JOB_PHASES:
            logs.append(EVENTS_LOG_QUEUE)
        if Phase.HEARTBEAT in phases and self.job_id is None:
            logs.append(HEARTBEATS_LOG_QUEUE)
        return tuple(logs) or (EVENTS_LOG_QUEUE,)  # nothing can match: read one anyway

    def __call__(self, event: Event) -> bool:
        return (
            (self.job_id is None or event.job_id == self.job_id)
            and (self.driver is None or event.driver == self.driver)
            and (self.host is None or event.host == self.host)
            and (not self.phases or event.phase in self.phases)
        )


def _ignore(event: Event, live: bool) -> None:
    return None


class EventStream(AsyncCloseable):
    """Events from the event log, live or replayed from its start.

    Use as ``async with client.events(...) as stream`` to be sure the subscription
    is in place before doing what produces the events, or iterate it directly.
    Iteration stops at a marker written by `mark_end()`; iterating again goes on
    from there, live.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        match: EventFilter,
        *,
        offset: str | datetime,
        shown_url: str = "the broker",
    ) -> None:
        self._connection = connection
        self._match = match
        self._offset = offset
        self._shown_url = shown_url  # for errors: the broker URL, password hidden
        self._channel: AbstractChannel | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        # The rest of a packed message's events: a loop broken off amid them and begun
        # again goes on from there.
        self._unread: deque[Event] = deque()
        self._marker: str | None = None
        self._markers_due = 0  # the marker's copies not read yet: one per log read
        # A worker that takes over a dead one's job re-publishes its terminal event under
        # the same event_id; a reader sees it once.
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def __aenter__(self) -> Self:
        await self._subscribe()
        return self

    async def _subscribe(self) -> None:
        # Through a cluster node that has just (re)started and does not run its replica
        # of a log yet (406 "does not have a replica on the local node"), as the gateway
        # and workers start: tried again, on a fresh channel, for as long as they would.
        await start_when_cluster_ready(
            lambda: set_up_whole(self._open_consumer(), self.aclose), self._start_over
        )

    async def _start_over(self) -> None:
        await self.aclose()
        self._inbox = asyncio.Queue()  # what a half-made subscription delivered goes too

    async def _open_consumer(self) -> None:
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=500)  # streams require a prefetch
        for log_queue in self._match.logs():
            await self._consume(self._channel, log_queue)
        if self._offset == "next":
            # A live reader resumes after a reconnect at the offset after the last message
            # it read, and before its first at "next" again, which skips what was logged
            # during the outage. A marker of its own, read at once, gives it an offset.
            await publish_log_marker(self._channel, EVENTS_LOG_QUEUE, uuid.uuid4().hex)

    async def _consume(self, channel: AbstractChannel, log_queue: str) -> None:
        try:
            # Passive: needs no permission, and the robust channel restores the consumer
            # after a reconnect (a queue made with get_queue(ensure=False) it forgets).
            stream = await channel.declare_queue(log_queue, passive=True)
        except ChannelNotFoundEntity:
            await self.aclose()  # else the robust channel reopens itself, unused
            raise FleetUnreachable(
                self._shown_url,
                f"no event log ({log_queue}): no gateway (of this sandfleet version) has run here",
            ) from None
        # aio-pika re-consumes with this same dict after a reconnect; keeping the next
        # offset in it makes the stream resume where it was, not at "next" (a gap).
        arguments: dict[str, Any] = {"x-stream-offset": self._offset}
        await stream.consume(partial(self._receive, arguments), arguments=arguments)

    async def _receive(self, arguments: dict[str, Any], message: AbstractIncomingMessage) -> None:
        if self._channel is None:
            # Closing: an ack written after channel.close makes the broker close the
            # whole connection (504 "expected 'channel.open'").
            return
        # Acked on arrival, not when read: a slow reader must not hold deliveries past
        # the broker's consumer timeout (which would close this channel).
        await message.ack()
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            arguments["x-stream-offset"] = offset + 1
        await self._inbox.put(message)

    async def aclose(self) -> None:
        # Forgotten first: _receive acks nothing from now on (see there).
        channel, self._channel = self._channel, None
        await close_whole(channel)

    async def mark_end(self) -> None:
        """Write a marker at the log's current end; iteration stops when it reaches it."""
        if self._channel is None:
            await self._subscribe()
        assert self._channel is not None
        self._marker = uuid.uuid4().hex
        self._markers_due = len(self._match.logs())
        await publish_log_marker(self._channel, EVENTS_LOG_QUEUE, self._marker)

    async def history(self) -> AsyncIterator[Event]:
        """The matching events the log holds now, oldest first (for a stream that reads
        from the start); iterating the stream afterwards goes on live."""
        await self.mark_end()
        async for event in self:
            yield event

    async def job_outcome(
        self, *, seen: Callable[[Event, bool], object] = _ignore, known_only: bool = False
    ) -> Event | None:
        """For a stream of one job's events read from the log's start: its terminal event.

        The job's latest event in the history decides whether it has ended (an id
        rejected, then submitted again, goes on); if not, the first live terminal event
        does. `seen(event, live)` sees each event on the way. With `known_only`, None
        when the history holds no event of the job (rather than waiting for one).
        """
        last: Event | None = None
        async for last in self.history():
            seen(last, False)
        if last is None and known_only:
            return None
        if last is not None and last.phase.is_terminal:
            return last
        async for event in self:
            seen(event, True)
            if event.phase.is_terminal:
                return event
        raise AssertionError("a live event stream does not end")

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        if self._channel is None:
            await self._subscribe()
        while True:
            while self._unread:
                event = self._unread.popleft()
                if self._first_sight(event) and self._match(event):
                    yield event
            message = await self._inbox.get()
            if is_log_marker(message):
                if message.message_id == self._marker:
                    self._markers_due -= 1
                    if self._markers_due <= 0:
                        return  # every log read up to the marker
                continue
            self._unread.extend(events_from_log(message.body, message.routing_key, message.type))

    def _first_sight(self, event: Event) -> bool:
        if event.event_id in self._seen:
            return False
        self._seen[event.event_id] = None
        if len(self._seen) > _SEEN_EVENTS:
            self._seen.popitem(last=False)
        return True
