"""Which job queues exist: the gateway accepts a job only where a queue will hold it."""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity


class RouteChecker:
    """Knows which job queues exist, so a job is accepted only where a queue will hold it.

    Positive answers are cached: job queues are durable and deleting one is an
    operator's act; the mandatory flag on the publish still catches that case.
    """

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._channel: AbstractRobustChannel | None = None
        self._known: set[str] = set()
        # One look-up at a time: a missing queue closes the shared channel, which would
        # fail a concurrent handler's look-up on it ("Channel closed").
        self._look_up = asyncio.Lock()
        self._asking: dict[str, asyncio.Future[bool]] = {}  # look-ups under way, by queue

    @property
    def known(self) -> frozenset[str]:
        """The job queues found to exist so far."""
        return frozenset(self._known)

    async def exists(self, queue_name: str) -> bool:
        if queue_name in self._known:
            return True
        # One look-up for all who ask at once: they are answered together, and go on
        # together (their `accepted` events then share a message: common.event_coalescing).
        asking = self._asking.get(queue_name)
        if asking is None:
            asking = self._asking[queue_name] = asyncio.ensure_future(self._ask(queue_name))
            asking.add_done_callback(lambda done: self._asked(queue_name, done))
        return await asyncio.shield(asking)

    def _asked(self, queue_name: str, done: asyncio.Future[bool]) -> None:
        del self._asking[queue_name]
        if not done.cancelled():
            done.exception()  # read: its askers may all have gone (no "never retrieved")

    async def _ask(self, queue_name: str) -> bool:
        if await self.message_count(queue_name) is None:
            return False
        self._known.add(queue_name)
        return True

    async def message_count(self, queue_name: str) -> int | None:
        """The messages ready in the queue (a passive declare); None if there is no such queue."""
        async with self._look_up:
            return await self._message_count(queue_name)

    async def _message_count(self, queue_name: str) -> int | None:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        try:
            # Not robust: a robust channel answers a passive declare of a queue it knows
            # from its cache, with the message count of the first answer.
            queue = await self._channel.declare_queue(queue_name, passive=True, robust=False)
        except ChannelNotFoundEntity:
            # A failed passive declare closes the channel; open a fresh one next time.
            await self._channel.close()
            self._channel = None
            return None
        return queue.declaration_result.message_count or 0
