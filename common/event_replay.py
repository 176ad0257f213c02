"""Events published again after a reconnection: a stream can lose what it confirmed.

A RabbitMQ stream can lose messages it has confirmed when its leader changes
(rabbitmq-server#9457, still open; seen here with 3.10 when a cluster node stops): a
job that was accepted or ended just then would lack that event in the log, and
whoever waits for its outcome would wait forever. So a publisher keeps the events it
published in the last REPLAY_WINDOW_SECONDS, and after each reconnection (the sign of
a node lost), once the streams have had REPLAY_DELAY_SECONDS to elect their new
leaders, publishes them again. A repeat carries the same event_id: readers see each
event once, as they do a taken-over job's terminal event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from aio_pika.abc import AbstractRobustConnection

from sandfleet.common.amqp import EventSink
from sandfleet.common.events import Event, Phase

log = logging.getLogger(__name__)

REPLAY_WINDOW_SECONDS = 120.0
REPLAY_DELAY_SECONDS = 10.0
REPLAY_MAX_EVENTS = 20_000  # a bound on memory: a busy gateway's two minutes


class ReplayedEvents:
    """An `EventSink` that remembers what it published lately, to publish it again
    after its connection comes back: `ReplayedEvents(sink, connection)`."""

    def __init__(self, sink: EventSink, connection: AbstractRobustConnection) -> None:
        self._sink = sink
        self._recent: deque[tuple[float, Event]] = deque(maxlen=REPLAY_MAX_EVENTS)
        self._replays: set[asyncio.Task[int]] = set()
        connection.reconnect_callbacks.add(self._after_reconnect)

    async def publish(self, event: Event) -> None:
        await self._sink.publish(event)
        if event.phase is not Phase.HEARTBEAT:  # the next one says as much
            self._recent.append((time.monotonic(), event))

    def _after_reconnect(self, *_: object) -> None:
        task = asyncio.create_task(self.replay(delay=REPLAY_DELAY_SECONDS))
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    async def replay(self, *, delay: float = 0.0) -> int:
        """After `delay` s, publish again what was published in the window before; how
        many events."""
        cutoff = time.monotonic() - REPLAY_WINDOW_SECONDS
        await asyncio.sleep(delay)  # the streams' new leaders, not a wait on an event
        recent = [event for at, event in list(self._recent) if at >= cutoff]
        for event in recent:
            try:
                await self._sink.publish(event)
            except Exception:  # the next reconnection tries again
                log.warning("event %s not published again", event.event_id, exc_info=True)
                return 0
        if recent:
            log.info("published %d recent events again after a reconnection", len(recent))
        return len(recent)

    async def aclose(self) -> None:
        for task in list(self._replays):
            task.cancel()
        await asyncio.gather(*self._replays, return_exceptions=True)
