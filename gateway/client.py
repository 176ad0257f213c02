"""The Python client: submit jobs, follow their events, read their history.

async with Client(url) as client:
    reply = await client.submit(request)
    async for event in client.events(job_id=reply.job_id):
        ...
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from sandfleet.common.amqp import JSON, connect, json_message
from sandfleet.common.events import Event, Phase
from sandfleet.common.lifecycle import AsyncCloseable
from sandfleet.common.models import CancelRequest, SandboxRequest, SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    CONTROL_EXCHANGE,
    EVENTS_LOG_QUEUE,
    LOG_MARKER_TYPE,
    SUBMIT_QUEUE,
    declare_topology,
)

log = logging.getLogger(__name__)

_SEEN_EVENTS = 100_000  # event ids remembered per stream, to drop repeats


class ClientClosed(RuntimeError):
    pass


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

    def __call__(self, event: Event) -> bool:
        return (
            (self.job_id is None or event.job_id == self.job_id)
            and (self.driver is None or event.driver == self.driver)
            and (self.host is None or event.host == self.host)
            and (not self.phases or event.phase in self.phases)
        )


class EventStream(AsyncCloseable):
    """Events from the event log, live or replayed from its start.

    Use as ``async with client.events(...) as stream`` to be sure the subscription
    is in place before doing what produces the events, or iterate it directly.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        match: EventFilter,
        *,
        offset: str | datetime,
    ) -> None:
        self._connection = connection
        self._match = match
        self._offset = offset
        self._channel: AbstractChannel | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._marker: str | None = None
        # A worker that takes over a dead one's job re-publishes its terminal event under
        # the same event_id; a reader sees it once.
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def __aenter__(self) -> Self:
        await self._subscribe()
        return self

    async def _subscribe(self) -> AbstractQueue:
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=500)  # streams require a prefetch
        log = await self._channel.declare_queue(EVENTS_LOG_QUEUE, passive=True)
        # aio-pika re-consumes with this same dict after a reconnect; keeping the next
        # offset in it makes the stream resume where it was, not at "next" (a gap).
        self._arguments: dict[str, Any] = {"x-stream-offset": self._offset}
        await log.consume(self._receive, arguments=self._arguments)
        return log

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        # Acked on arrival, not when read: a slow reader must not hold deliveries past
        # the broker's consumer timeout (which would close this channel).
        await message.ack()
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._arguments["x-stream-offset"] = offset + 1
        await self._inbox.put(message)

    async def aclose(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None

    async def mark_end(self) -> None:
        """Write a marker at the log's current end; iteration stops when it reaches it."""
        if self._channel is None:
            await self._subscribe()
        assert self._channel is not None
        self._marker = uuid.uuid4().hex
        await self._channel.default_exchange.publish(
            aio_pika.Message(b"", type=LOG_MARKER_TYPE, message_id=self._marker),
            routing_key=EVENTS_LOG_QUEUE,
        )

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        if self._channel is None:
            await self._subscribe()
        while True:
            message = await self._inbox.get()
            if message.type == LOG_MARKER_TYPE:
                if message.message_id == self._marker:
                    return
                continue
            try:
                event = Event.model_validate_json(message.body)
            except ValidationError as exc:
                # Anyone may publish to the events exchange; a reader skips what is not
                # an event rather than dying on it.
                log.warning(
                    "skipped a %d-byte message in the event log that is not an event (%d errors)",
                    len(message.body),
                    exc.error_count(),
                )
                continue
            if event.event_id in self._seen:
                continue
            self._seen[event.event_id] = None
            if len(self._seen) > _SEEN_EVENTS:
                self._seen.popitem(last=False)
            if self._match(event):
                yield event


class Client(AsyncCloseable):
    """A connection to a sandfleet broker for submitters and watchers."""

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        self._settings = settings or Settings()
        self._url = url or self._settings.broker_url
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._pending: dict[str, asyncio.Future[SubmitReply]] = {}
        self._closed = False

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClientClosed("this Client was closed; make a new one")
        self._connection = await connect(self._url, name="sandfleet-client")
        self._channel = await self._connection.channel(publisher_confirms=True)
        await declare_topology(self._channel, self._settings)
        self._reply_queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await self._reply_queue.consume(self._on_reply, no_ack=True)
        return self

    async def aclose(self) -> None:
        self._closed = True
        for future in self._pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def _open_connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise ClientClosed("use the Client inside 'async with'")
        return self._connection

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(SubmitReply.model_validate_json(message.body))

    async def submit(
        self, request: SandboxRequest | dict[str, Any] | bytes, *, timeout: float = 30.0
    ) -> SubmitReply:
        """Send a request to the gateway and return its reply (accepted or rejected)."""
        self._open_connection()
        assert self._channel is not None and self._reply_queue is not None
        if isinstance(request, SandboxRequest):
            body = request.model_dump_json(exclude_none=True).encode()
        elif isinstance(request, dict):
            body = json.dumps(request).encode()  # the gateway validates; its reply names the errors
        else:
            body = request
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[SubmitReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type=JSON,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    correlation_id=correlation_id,
                    reply_to=self._reply_queue.name,
                ),
                routing_key=SUBMIT_QUEUE,
            )
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(correlation_id, None)

    async def cancel(self, job_id: str, *, reason: str = "cancelled by request") -> None:
        """Ask every worker to cancel `job_id`: running, waiting for GPUs or still queued.

        The worker that holds the job (or later receives it) emits `cancelled`.
        """
        self._open_connection()
        assert self._channel is not None
        request = CancelRequest(job_id=job_id, reason=reason)
        exchange = await self._channel.get_exchange(CONTROL_EXCHANGE)
        await exchange.publish(json_message(request, type="sandfleet.cancel"), routing_key="")

    def events(
        self,
        *,
        job_id: str | None = None,
        driver: str | None = None,
        host: str | None = None,
        phases: Collection[Phase] = (),
        from_start: bool = False,
    ) -> EventStream:
        """Live events matching the filter; `from_start` replays the log's history first."""
        match = EventFilter(job_id=job_id, driver=driver, host=host, phases=phases)
        return EventStream(self._open_connection(), match, offset="first" if from_start else "next")

    async def workers(self, *, since: timedelta = timedelta(minutes=10)) -> list[Event]:
        """Each worker's latest heartbeat within `since` (see `common.events.worker_state`)."""
        match = EventFilter(phases={Phase.HEARTBEAT})
        start = datetime.now(UTC) - since
        latest: dict[str, Event] = {}
        async with EventStream(self._open_connection(), match, offset=start) as stream:
            await stream.mark_end()
            async for event in stream:
                latest[event.worker_id or ""] = event
        return sorted(latest.values(), key=lambda e: (e.host, e.driver or "", e.worker_id or ""))

    async def history(self, job_id: str) -> list[Event]:
        """Every event the log holds for `job_id`, oldest first."""
        async with self.events(job_id=job_id, from_start=True) as stream:
            await stream.mark_end()
            return [event async for event in stream]
