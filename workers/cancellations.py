"""The cancellations a worker knows of, read from the control log and kept live.

The log (a stream) is replayed from its start before the worker takes any job, so a
job cancelled while it sat in a queue is recognised whichever worker receives it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractChannel
from pydantic import ValidationError

from common.models import CancelRequest
from common.stream_follower import StreamFollower
from common.topology import CONTROL_LOG_QUEUE

log = logging.getLogger(__name__)

OnCancel = Callable[[CancelRequest], Awaitable[None]]


class Cancellations:
    def __init__(self, channel: AbstractChannel, on_cancel: OnCancel) -> None:
        self._on_cancel = on_cancel
        self._requests: dict[str, CancelRequest] = {}
        self._follower = StreamFollower(channel, CONTROL_LOG_QUEUE, self._on_message)

    def get(self, job_id: str) -> CancelRequest | None:
        return self._requests.get(job_id)

    async def start(self) -> None:
        """Read every past cancellation; then keep acting on new ones."""
        await self._follower.start()

    async def _on_message(self, body: bytes, live: bool) -> None:
        try:
            request = CancelRequest.model_validate_json(body)
        except ValidationError:
            log.warning("skipped a %d-byte control message that is not a cancellation", len(body))
            return
        self._requests[request.job_id] = request
        if live:
            await self._on_cancel(request)
