"""The cancellations a worker knows of, read from the control log and kept live.

The log (a stream) is replayed from its start before the worker takes any job, so a
job cancelled while it sat in a queue is recognised whichever worker receives it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import ValidationError

from common.models import CancelRequest
from common.topology import CONTROL_LOG_QUEUE, LOG_MARKER_TYPE

log = logging.getLogger(__name__)

OnCancel = Callable[[CancelRequest], Awaitable[None]]


class Cancellations:
    def __init__(self, channel: AbstractChannel, on_cancel: OnCancel) -> None:
        self._channel = channel
        self._on_cancel = on_cancel
        self._requests: dict[str, CancelRequest] = {}
        self._caught_up = asyncio.Event()
        self._marker = uuid.uuid4().hex

    def get(self, job_id: str) -> CancelRequest | None:
        return self._requests.get(job_id)

    async def start(self) -> None:
        """Consume the control log from its start; return once the history is read."""
        await self._channel.set_qos(prefetch_count=1000)  # streams require a prefetch
        log_queue = await self._channel.declare_queue(CONTROL_LOG_QUEUE, passive=True)
        await log_queue.consume(self._on_message, arguments={"x-stream-offset": "first"})
        await self._channel.default_exchange.publish(
            aio_pika.Message(b"", type=LOG_MARKER_TYPE, message_id=self._marker),
            routing_key=CONTROL_LOG_QUEUE,
        )
        await self._caught_up.wait()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        if message.type == LOG_MARKER_TYPE:
            if message.message_id == self._marker:
                self._caught_up.set()
            return
        try:
            request = CancelRequest.model_validate_json(message.body)
        except ValidationError:
            log.warning(
                "skipped a %d-byte control message that is not a cancellation", len(message.body)
            )
            return
        self._requests[request.job_id] = request
        if self._caught_up.is_set():
            await self._on_cancel(request)
