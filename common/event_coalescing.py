"""An event sink that publishes together the events handed to it in one pass of the
event loop: a gateway admitting hundreds of submissions at once writes their `accepted`
events as a few messages rather than one each (common.event_batches), and each caller
still returns only once the broker has confirmed its own event.

Nothing waits to fill a batch: the events of one pass go at the end of it, so an event
published alone goes as soon as it did before, as a lone event.
"""

from __future__ import annotations

import asyncio

from sandfleet.common.event_publisher import EventBatchSink
from sandfleet.common.events import Event


class CoalescedEvents:
    """`await events.publish(event)`: returns once `event` is confirmed (or raises what
    its message's publish raised)."""

    def __init__(self, publisher: EventBatchSink) -> None:
        self._publisher = publisher
        self._pending: list[tuple[Event, asyncio.Future[None]]] = []
        self._publishing: set[asyncio.Task[None]] = set()

    async def publish(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._send_pending)
        confirmed = loop.create_future()
        # Its outcome counts as read even if this caller is gone (no "never retrieved").
        confirmed.add_done_callback(_retrieved)
        self._pending.append((event, confirmed))
        # Shielded: a caller cancelled does not take the others' events down with it
        # (its own goes out anyway, as a publish already written would).
        await asyncio.shield(confirmed)

    def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._send(batch))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _send(self, batch: list[tuple[Event, asyncio.Future[None]]]) -> None:
        try:
            await self._publisher.publish_many([event for event, _ in batch])
        except asyncio.CancelledError:
            for _, confirmed in batch:
                confirmed.cancel()  # the sink closed: so are its callers, about to be
            raise
        except Exception as exc:
            for _, confirmed in batch:
                if not confirmed.done():
                    confirmed.set_exception(exc)
        else:
            for _, confirmed in batch:
                if not confirmed.done():
                    confirmed.set_result(None)

    async def aclose(self) -> None:
        """Cancel the publishes in flight, and with them their callers' waits."""
        for task in list(self._publishing):
            task.cancel()
        await asyncio.gather(*self._publishing, return_exceptions=True)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
