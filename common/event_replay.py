"""Each job's latest event, published again a little later: a stream can lose what it
confirmed.

A RabbitMQ stream can lose messages it has confirmed when its leader changes
(rabbitmq-server#9457, still open; the cluster fault test saw it with 3.10: jobs that
ran once, whose outcome every node's copy of the event log lacked). Whoever waits for
such a job's outcome would wait forever. So a publisher remembers the latest event it
published for each job, and ECHO_AFTER_SECONDS later (long past a leader election)
publishes it again (those `echo` picks). Only the latest per job, and readers ignore
an event that would take a job back (gateway.job_rules). A repeat carries the same
event_id, and readers see each event once, as they see a taken-over job's terminal
event once. The cost: about one more event per job in the log.

Echoes go out on a channel opened for the round: a channel that wrote to a stream
before its leader changed can go on losing what it writes there until it is reopened
(what the fault test showed of `accepted` events echoed on the gateway's own channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from aio_pika.abc import AbstractConnection

from sandfleet.common.amqp import EventSink
from sandfleet.common.channel_lifecycle import close_whole
from sandfleet.common.event_publisher import EventBatchSink, EventPublisher
from sandfleet.common.events import Event, Phase
from sandfleet.common.topology import EVENTS_EXCHANGE

log = logging.getLogger(__name__)

ECHO_AFTER_SECONDS = 30.0
ECHO_EVERY_SECONDS = 10.0
# A bound on memory (each kept as its JSON, ~0.5 KB: 50 MB at most); past it the oldest
# go unechoed, and `unechoed` counts them. An event waits up to ECHO_AFTER_SECONDS +
# ECHO_EVERY_SECONDS: this holds that long of 2,500 jobs' events a second.
MAX_REMEMBERED_JOBS = 100_000
ECHO_WINDOW = 500  # echoes published together (packed into a few messages)

Echo = Callable[[Event], Awaitable[bool]]


async def _every_event(_: Event) -> bool:
    return True


class EchoedEvents:
    """An `EventSink` that publishes each job's latest event again later:
    `async with EchoedEvents(sink, lambda: fresh_events(connection)) as events:`."""

    def __init__(
        self,
        sink: EventSink,
        fresh: Callable[[], AbstractAsyncContextManager[EventBatchSink]],
        *,
        echo: Echo = _every_event,
    ) -> None:
        """`fresh()`: a publisher on a channel of its own (`fresh_events`)."""
        self._sink = sink
        self._fresh = fresh
        self._echo = echo
        # job id → (when, its latest event's JSON): bytes, a quarter of an Event's memory
        self._latest: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._echoing: asyncio.Task[None] | None = None
        self.unechoed = 0  # events forgotten unechoed past MAX_REMEMBERED_JOBS
        self._unechoed_said = 0  # ...of which the log has been told

    async def __aenter__(self) -> EchoedEvents:
        self._echoing = asyncio.create_task(self._echo_forever())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._echoing is not None:
            self._echoing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._echoing
            self._echoing = None

    async def publish(self, event: Event) -> None:
        await self._sink.publish(event)
        if event.job_id is not None and event.phase is not Phase.HEARTBEAT:
            self._latest.pop(event.job_id, None)
            self._latest[event.job_id] = (time.monotonic(), event.model_dump_json().encode())
            if len(self._latest) > MAX_REMEMBERED_JOBS:
                self._latest.popitem(last=False)
                self.unechoed += 1

    async def _echo_forever(self) -> None:
        while True:
            await asyncio.sleep(ECHO_EVERY_SECONDS)  # a pace, not a wait on an event
            try:
                await self.echo_due()
            except Exception:  # the broker away: these wait for the next round
                log.warning("events not echoed this round", exc_info=True)

    async def echo_due(self, *, now: float | None = None) -> int:
        """Publish again each job's latest event older than ECHO_AFTER_SECONDS (that
        `echo` picks); how many."""
        cutoff = (time.monotonic() if now is None else now) - ECHO_AFTER_SECONDS
        due = [(job_id, body) for job_id, (at, body) in self._latest.items() if at <= cutoff]
        if self.unechoed > self._unechoed_said:
            log.warning("%d events left unechoed: over %d jobs' in flight",
                        self.unechoed - self._unechoed_said, MAX_REMEMBERED_JOBS)  # fmt: skip
            self._unechoed_said = self.unechoed
        if not due:
            return 0
        echoed = 0
        async with self._fresh() as sink:
            for start in range(0, len(due), ECHO_WINDOW):
                window = due[start : start + ECHO_WINDOW]
                events = [Event.model_validate_json(body) for _, body in window]
                picked = [event for event in events if await self._echo(event)]
                await sink.publish_many(picked)  # packed: a few messages a window
                echoed += len(picked)
                for job_id, body in window:  # unless a later event took its place
                    if self._latest.get(job_id, (None, None))[1] is body:
                        del self._latest[job_id]
        return echoed


@contextlib.asynccontextmanager
async def fresh_events(
    connection: AbstractConnection, *, pack: bool = True
) -> AsyncIterator[EventBatchSink]:
    """An event publisher on a channel of its own, closed afterwards."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        yield EventPublisher(await channel.get_exchange(EVENTS_EXCHANGE, ensure=False), pack=pack)
    finally:
        await close_whole(channel)
