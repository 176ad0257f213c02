"""Status events onto the events exchange, each confirmed by the broker, one at a time
or many together (common.event_batches packs them)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from aio_pika.abc import AbstractExchange

from sandfleet.common.amqp import (
    EventSink,
    json_properties,
    publish_body,
    publish_through_outages,
)
from sandfleet.common.event_batches import MAX_EVENTS_PER_MESSAGE, packed
from sandfleet.common.events import Event


class EventBatchSink(EventSink, Protocol):
    """An `EventSink` that also takes many events at once (EventPublisher is one)."""

    async def publish_many(self, events: Sequence[Event]) -> None: ...


class EventPublisher:
    """A publish that meets a broker outage is retried until the robust connection is
    back (`retry_seconds` at most): an event, terminal ones above all, is not dropped
    because the broker restarted. A repeat carries the same event_id."""

    def __init__(
        self, exchange: AbstractExchange, *, pack: bool = True, retry_seconds: float = 120.0
    ) -> None:
        """`pack`: several events a message where they share a routing key; otherwise
        one message each, still confirmed together."""
        self._exchange = exchange
        self._max_packed = MAX_EVENTS_PER_MESSAGE if pack else 1
        self._retry_seconds = retry_seconds

    async def publish(self, event: Event) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: Sequence[Event]) -> None:
        """Publish `events` in as few messages as their routing keys allow, each job's in
        the order given; returns once the broker has confirmed every one."""
        if not events:
            return
        messages = packed(events, max_events=self._max_packed)
        what = f"event {events[0].event_id}" + (
            f" and {len(events) - 1} more" if len(events) > 1 else ""
        )

        async def publish_all() -> None:
            # Written in order on one channel (the log keeps it); confirmed together.
            await asyncio.gather(
                *(
                    publish_body(
                        self._exchange,
                        message.body,
                        # The message's id is its first event's: a repeat (an outage's
                        # retry) carries the same ids.
                        json_properties(
                            message_id=message.message_id, message_type=message.message_type
                        ),
                        routing_key=message.routing_key,
                        mandatory=False,  # the logs take every event; no listener: no error
                    )
                    for message in messages
                )
            )

        await publish_through_outages(publish_all, what=what, retry_seconds=self._retry_seconds)
