"""An event sink that publishes together the events handed to it in one pass of the
event loop: a gateway admitting hundreds of submissions at once writes their `accepted`
events as a few messages rather than one each (common.event_batches), and each caller
still returns only once the broker has confirmed its own event.

Nothing waits to fill a batch: the events of one pass go at the end of it, so an event
published alone goes as soon as it did before, as a lone event.
"""

from __future__ import annotations

import asyncio
import logging

from sandfleet.common.event_publisher import EventBatchSink
from sandfleet.common.events import Event

log = logging.getLogger(__name__)

Batch = list[tuple[Event, asyncio.Future[None]]]


class CoalescedEvents:
    """`await events.publish(event)`: returns once `event` is confirmed (or raises what
    its batch's publish raised)."""

    def __init__(self, publisher: EventBatchSink) -> None:
        self._publisher = publisher
        self._pending: Batch = []
        self._publishing: dict[asyncio.Task[None], Batch] = {}
        self._closed = False

    async def publish(self, event: Event) -> None:
        if self._closed:
            raise ConnectionError("the event publisher is closed")
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
        if not batch or self._closed:
            _settle(batch, None, cancelled=True)
            return
        task = asyncio.create_task(self._send(batch))
        self._publishing[task] = batch
        task.add_done_callback(self._sent)

    async def _send(self, batch: Batch) -> None:
        try:
            await self._publisher.publish_many([event for event, _ in batch])
        except Exception:
            log.warning("%d events not published", len(batch), exc_info=True)
            raise

    def _sent(self, task: asyncio.Task[None]) -> None:
        # Here, not in `_send`: a task cancelled before it ran never enters its body.
        batch = self._publishing.pop(task)
        if task.cancelled():
            _settle(batch, None, cancelled=True)
        else:
            _settle(batch, task.exception(), cancelled=False)

    async def aclose(self) -> None:
        """Publish nothing more; cancel the publishes in flight, and with them their
        callers' waits (and those of events not sent yet)."""
        self._closed = True
        _settle(self._pending, None, cancelled=True)
        self._pending = []
        tasks = list(self._publishing)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _settle(batch: Batch, error: BaseException | None, *, cancelled: bool) -> None:
    for _, confirmed in batch:
        if confirmed.done():
            continue
        if cancelled:
            confirmed.cancel()
        elif error is not None:
            confirmed.set_exception(error)
        else:
            confirmed.set_result(None)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
