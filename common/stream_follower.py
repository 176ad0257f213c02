"""Following a RabbitMQ stream: replay it from the start, know when the replay has
caught up with the present, then keep reading live.

The end of the history is found by writing a marker message into the stream and
reading until it comes back, which needs no clock and no guess.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from sandfleet.common.topology import LOG_MARKER_TYPE

OnMessage = Callable[[bytes, bool], Awaitable[None]]  # (body, live)


class StreamFollower:
    def __init__(self, channel: AbstractChannel, queue: str, on_message: OnMessage) -> None:
        self._channel = channel
        self._queue = queue
        self._on_message = on_message
        self._caught_up = asyncio.Event()
        self._marker = uuid.uuid4().hex

    async def start(self) -> None:
        """Start reading from the stream's first message; return once caught up."""
        await self._channel.set_qos(prefetch_count=1000)  # streams require a prefetch
        stream = await self._channel.declare_queue(self._queue, passive=True)
        # Restored with this same dict after a reconnect: it resumes at the next offset.
        self._arguments: dict[str, object] = {"x-stream-offset": "first"}
        await stream.consume(self._deliver, arguments=self._arguments)  # type: ignore[arg-type]
        await self._channel.default_exchange.publish(
            aio_pika.Message(b"", type=LOG_MARKER_TYPE, message_id=self._marker),
            routing_key=self._queue,
        )
        await self._caught_up.wait()

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._arguments["x-stream-offset"] = offset + 1
        if message.type == LOG_MARKER_TYPE:
            if message.message_id == self._marker:
                self._caught_up.set()
            return
        await self._on_message(message.body, self._caught_up.is_set())
