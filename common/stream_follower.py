"""Following a RabbitMQ stream: replay it from the start, know when the replay has
caught up with the present, then keep reading live.

The end of the history is found by writing a marker message into the stream and
reading until it comes back, which needs no clock and no guess. The marker goes in
through the exchange that feeds the log, never amq.default (see common.topology).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError

from sandfleet.common.topology import (
    CONTROL_EXCHANGE,
    CONTROL_LOG_QUEUE,
    EVENTS_EXCHANGE,
    EVENTS_LOG_QUEUE,
    HEARTBEATS_LOG_QUEUE,
    LOG_MARKER_KEY_PREFIX,
    LOG_MARKER_TYPE,
    LOGS_EXCHANGE,
    LOGS_LOG_QUEUE,
)


class LogMessage(Protocol):
    """What a follower's callback reads of a message (aio-pika's message has it)."""

    @property
    def body(self) -> bytes: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...


log = logging.getLogger(__name__)

OnMessage = Callable[[LogMessage, bool], Awaitable[None]]  # (message, live)

PREFETCH = 1000  # streams require a prefetch
# Acks go out for this many messages at once (multiple=True), well inside the prefetch
# so the broker never waits for one: an ack per message was a good part of what a
# reader spent on each heartbeat it skips. A stream redelivers nothing unacked: a
# reader that reconnects resumes at its own offset.
ACK_EVERY = 100  # ...or a tenth of a smaller prefetch
# ...and the last ones this long after they came at the latest: a quiet log must not
# leave its reader holding a message past the broker's consumer timeout.
ACK_AFTER_SECONDS = 1.0


class StreamFollower:
    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        on_message: OnMessage,
        *,
        start_at: int | None = None,
        prefetch: int = PREFETCH,
    ) -> None:
        """`start_at`: the stream offset to start reading at (None: the first message);
        `prefetch`: the messages delivered and not yet acked, at most."""
        self._channel = channel
        self._prefetch = prefetch
        self._ack_every = max(1, min(ACK_EVERY, prefetch // 10))
        self._queue = queue
        self._on_message = on_message
        self._caught_up = asyncio.Event()
        self._marker = uuid.uuid4().hex
        self._unacked = 0
        self._latest: AbstractIncomingMessage | None = None  # the latest handled, unacked
        self._acked: AbstractIncomingMessage | None = None  # the latest acked
        self._ack_timer: asyncio.TimerHandle | None = None
        self._acking: set[asyncio.Task[None]] = set()
        # Restored with this same dict after a reconnect: it resumes at the next offset.
        self._arguments: dict[str, object] = {
            "x-stream-offset": "first" if start_at is None else start_at
        }

    @property
    def next_offset(self) -> int | None:
        """The offset after the latest message delivered (None before the first)."""
        offset = self._arguments["x-stream-offset"]
        return offset if isinstance(offset, int) else None

    async def start(self) -> None:
        """Start reading at the chosen offset; return once caught up with the present."""
        await self._channel.set_qos(prefetch_count=self._prefetch)
        stream = await self._channel.declare_queue(self._queue, passive=True)
        await stream.consume(self._deliver, arguments=self._arguments)  # type: ignore[arg-type]
        await publish_log_marker(self._channel, self._queue, self._marker)
        await self._caught_up.wait()

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        # Nothing awaited before the callback: each message is a task of its own, and
        # one that waited here would be overtaken by the next (offsets and all).
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._arguments["x-stream-offset"] = offset + 1
        marker = is_log_marker(message)
        if marker:
            if message.message_id == self._marker:
                self._caught_up.set()
        else:
            await self._on_message(message, self._caught_up.is_set())
        # Acked once handled: a callback that holds its message (a reader that must
        # write what it has read first) holds the acks, and past the prefetch the
        # broker sends no more.
        self._unacked += 1
        if self._latest is None or _later(message, self._latest):
            self._latest = message
        if self._unacked >= self._ack_every or marker:
            await self._ack()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                ACK_AFTER_SECONDS, self._ack_later
            )

    async def _ack(self) -> None:
        """Ack every message up to the latest handled (never one acked already: the
        broker closes the channel on an unknown delivery tag)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        latest, self._latest, self._unacked = self._latest, None, 0
        if latest is not None and (self._acked is None or _later(latest, self._acked)):
            self._acked = latest
            try:
                await latest.ack(multiple=True)
            except ChannelInvalidStateError:
                # Lost with its channel, which is no error: the reader resumes at its
                # own offset on the channel reopened.
                log.debug("stream ack not sent: its channel closed")

    def _ack_later(self) -> None:
        self._ack_timer = None
        task = asyncio.create_task(self._ack())
        self._acking.add(task)
        task.add_done_callback(_acked)
        task.add_done_callback(self._acking.discard)


def _later(message: AbstractIncomingMessage, than: AbstractIncomingMessage) -> bool:
    """Whether `message` came after `than` (a channel reopened since starts its
    delivery tags afresh: all its messages are later)."""
    # aio-pika will not name a closed channel (it raises): a message whose channel has
    # closed since is earlier than any on the channel open now, and none is later than
    # it could be acked. Before, that raise on every ack after a reopen left the reader
    # acking nothing, and the broker stopped delivering past the prefetch.
    if _channel_closed(than):
        return True
    if _channel_closed(message):
        return False
    if message.channel is not than.channel:
        return True
    return (message.delivery_tag or 0) > (than.delivery_tag or 0)


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    try:
        message.channel  # noqa: B018 (the property raises on a closed channel)
    except ChannelInvalidStateError:
        return True
    return False


def _acked(task: asyncio.Task[None]) -> None:
    # An ack lost with its channel is no error: the reader resumes at its own offset.
    if not task.cancelled() and task.exception() is not None:
        log.debug("stream ack not sent: %s", task.exception())


# The exchange that feeds each log, where its markers go in.
_LOG_EXCHANGES = {
    EVENTS_LOG_QUEUE: EVENTS_EXCHANGE,
    HEARTBEATS_LOG_QUEUE: EVENTS_EXCHANGE,  # a marker there lands in the event log too
    CONTROL_LOG_QUEUE: CONTROL_EXCHANGE,
    LOGS_LOG_QUEUE: LOGS_EXCHANGE,
}


async def publish_log_marker(channel: AbstractChannel, log_queue: str, marker: str) -> None:
    """Write marker `marker` at the end of `log_queue` (a log in `_LOG_EXCHANGES`)."""
    exchange = await channel.get_exchange(_LOG_EXCHANGES[log_queue])  # passive
    await exchange.publish(
        aio_pika.Message(b"", type=LOG_MARKER_TYPE, message_id=marker),
        routing_key=LOG_MARKER_KEY_PREFIX + marker,
    )


def is_log_marker(message: AbstractIncomingMessage) -> bool:
    return message.type == LOG_MARKER_TYPE and (message.routing_key or "").startswith(
        LOG_MARKER_KEY_PREFIX
    )
