"""Reading one job's output from the log stream (see common.job_logs).

The stream holds every job's output, so a reader starts it where the job began, not at
its beginning: at a timestamp offset a little before the job's first event (RabbitMQ
starts a timestamp offset at a chunk boundary, so a little earlier is all it costs),
and keeps the one job's messages. A reader needs what an event reader needs, on the
log stream: read permission on `sandfleet.logs.log`, and write permission on
`sandfleet.logs` for `log-marker.*` keys, to mark where the output so far ends.

Only workers may publish to sandfleet.logs under any key but a marker's (topic
authorisation, common.broker_roles), so a message under a marker's key that is not a
marker is skipped: a submitter cannot write into a job's log.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Self

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from sandfleet.common.channel_lifecycle import close_whole, set_up_whole
from sandfleet.common.errors import FleetUnreachable, JobNotFound
from sandfleet.common.events import Event, Phase
from sandfleet.common.job_logs import (
    JOB_ID_HEADER,
    LOG_CHUNK_TYPE,
    LOG_END_TYPE,
    SEQUENCE_HEADER,
    LineSplitter,
)
from sandfleet.common.lifecycle import AsyncCloseable
from sandfleet.common.stream_follower import is_log_marker, publish_log_marker
from sandfleet.common.topology import LOG_MARKER_KEY_PREFIX, LOGS_LOG_QUEUE

if TYPE_CHECKING:
    from sandfleet.gateway.client import Client

# How much earlier than a job's first event its output is looked for: clocks of the
# gateway, the workers and the broker may disagree by this much.
CLOCK_SLACK = timedelta(seconds=60)


class JobLogStream(AsyncCloseable):
    """One job's output messages from the log stream, read from `offset` on."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        job_id: str,
        *,
        offset: datetime,
        shown_url: str = "the broker",
    ) -> None:
        self._connection = connection
        self.job_id = job_id
        self._shown_url = shown_url
        self._arguments: dict[str, Any] = {"x-stream-offset": offset}
        self._channel: AbstractChannel | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._marker: str | None = None
        self._next_sequence = 0  # a message seen again after a reconnect is skipped
        self.ended = False  # the job's end-of-log message came

    async def __aenter__(self) -> Self:
        await set_up_whole(self._subscribe(), self.aclose)
        return self

    async def _subscribe(self) -> None:
        self._channel = channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)  # streams require a prefetch
        try:
            stream = await channel.declare_queue(LOGS_LOG_QUEUE, passive=True)
        except ChannelNotFoundEntity:
            await self.aclose()
            raise FleetUnreachable(
                self._shown_url, f"no log stream ({LOGS_LOG_QUEUE}): no gateway has run here"
            ) from None
        # Restored with this same dict after a reconnect: it resumes at the next offset.
        await stream.consume(self._receive, arguments=self._arguments)

    async def aclose(self) -> None:
        # Forgotten first: _receive acks nothing from now on (see there).
        channel, self._channel = self._channel, None
        await close_whole(channel)

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        if self._channel is None:
            return  # closing: an ack after channel.close costs the connection (504)
        await message.ack()  # on arrival: a slow reader must not hit the consumer timeout
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._arguments["x-stream-offset"] = offset + 1
        if is_log_marker(message) or self._of_this_job(message):
            await self._inbox.put(message)

    def _of_this_job(self, message: AbstractIncomingMessage) -> bool:
        if (message.routing_key or "").startswith(LOG_MARKER_KEY_PREFIX):
            return False  # a reader's key: no worker's output comes under it
        headers = message.headers or {}
        return message.type in (LOG_CHUNK_TYPE, LOG_END_TYPE) and (
            headers.get(JOB_ID_HEADER) == self.job_id
        )

    async def mark_end(self) -> None:
        """Mark the stream's current end: `chunks()` stops there (if not at the log's end)."""
        assert self._channel is not None, "use the stream inside 'async with'"
        self._marker = uuid.uuid4().hex
        await publish_log_marker(self._channel, LOGS_LOG_QUEUE, self._marker)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The job's output, until its end-of-log message or this reader's marker."""
        while not self.ended:
            message = await self._inbox.get()
            if is_log_marker(message):
                if message.message_id == self._marker:
                    return
                continue
            sequence = (message.headers or {}).get(SEQUENCE_HEADER)
            if not isinstance(sequence, int) or sequence < self._next_sequence:
                continue
            self._next_sequence = sequence + 1
            if message.type == LOG_END_TYPE:
                self.ended = True
            elif message.body:
                yield message.body


def log_start(history: list[Event]) -> datetime:
    """Where in the log stream a job's output may begin: before its sandbox started."""
    # The first start: an adopted sandbox's `Adopted` comes later, and its output began
    # with the first worker.
    started = [e.timestamp for e in history if e.phase is Phase.RUNNING]
    return (started[0] if started else history[0].timestamp) - CLOCK_SLACK


async def job_log_lines(
    client: Client, job_id: str, *, follow: bool, tail: int | None
) -> AsyncIterator[str]:
    """Job `job_id`'s output lines (the last `tail` of those shipped so far); with
    `follow`, then the rest as it is printed, until the job's log ends."""
    history = await client.history(job_id)
    if not history:
        raise JobNotFound(job_id)
    splitter = LineSplitter()
    async with client.job_log(job_id, offset=log_start(history)) as log:
        await log.mark_end()
        async for line in _so_far(log, splitter, tail):
            yield line
        if follow and not log.ended:
            async for line in _the_rest(client, log, splitter):
                yield line
        for line in splitter.rest():
            yield line


async def _so_far(
    log: JobLogStream, splitter: LineSplitter, tail: int | None
) -> AsyncIterator[str]:
    if tail is None:
        async for chunk in log.chunks():
            for line in splitter.feed(chunk):
                yield line
        return
    last: deque[str] = deque(maxlen=tail)
    async for chunk in log.chunks():
        last.extend(splitter.feed(chunk))
    for line in last:
        yield line


async def _the_rest(
    client: Client, log: JobLogStream, splitter: LineSplitter
) -> AsyncIterator[str]:
    # The end-of-log message ends it; should none come (a job that never started, a
    # worker that died), the job's terminal event does: a marker put in then ends it.
    ending = asyncio.create_task(_mark_end_when_over(client, log))
    try:
        async for chunk in log.chunks():
            for line in splitter.feed(chunk):
                yield line
    finally:
        ending.cancel()


async def _mark_end_when_over(client: Client, log: JobLogStream) -> None:
    async with client.events(job_id=log.job_id, from_start=True) as events:
        await events.job_outcome()
    await log.mark_end()
