"""Answers questions about the fleet's jobs from this gateway's view: the consumer of
sandfleet.view (see common.view_queries). Every gateway consumes it; any one answers."""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from sandfleet.common.amqp import send_reply
from sandfleet.common.topology import VIEW_QUEUE
from sandfleet.common.view_queries import ViewReply, ViewStatus, parse_query
from sandfleet.gateway.job_view import JobView

log = logging.getLogger(__name__)

# A reply stays well under a broker's default frame limits and a client's patience.
MAX_REPLY_BYTES = 1 << 20
QUERY_PREFETCH = 8


class ViewDesk:
    def __init__(self, channel: AbstractChannel, view: JobView, *, host: str) -> None:
        self._channel = channel
        self._view = view
        self._host = host

    async def start(self) -> None:
        await self._channel.set_qos(prefetch_count=QUERY_PREFETCH)
        queue = await self._channel.get_queue(VIEW_QUEUE)
        await queue.consume(self._on_query)

    async def _on_query(self, message: AbstractIncomingMessage) -> None:
        # A question is answered or dropped, never requeued: its asker waits a while
        # only, and another try is the asker's to make.
        async with message.process(ignore_processed=True):
            await send_reply(self._channel, message, await self.answer(message.body))

    async def answer(self, body: bytes) -> ViewReply:
        query = parse_query(body)
        if isinstance(query, list):
            return ViewReply(status=ViewStatus.REJECTED, gateway=self._host, errors=query)
        return bounded_reply(await self._view.answer(query))


def bounded_reply(reply: ViewReply, *, max_bytes: int = MAX_REPLY_BYTES) -> ViewReply:
    """`reply`, with the newest jobs it lists only, as many as fit in `max_bytes`."""
    size = len(reply.model_dump_json(exclude_none=True))
    if size <= max_bytes or not reply.jobs:
        return reply
    jobs = reply.jobs
    while jobs and size > max_bytes:
        jobs = jobs[: len(jobs) * max_bytes // size * 9 // 10]
        reply = reply.model_copy(update={"jobs": jobs, "truncated": True})
        size = len(reply.model_dump_json(exclude_none=True))
    return reply
