"""The user cancellations a worker knows of: the one place it looks them up.

They come from the control log (a stream), written there by the gateway (which checked
that the requester may cancel the job, and signed it: with trusted keys set, an unsigned
or badly signed cancellation is skipped), replayed from its start before the worker
takes any job, so a job cancelled while it sat in a queue is recognised whichever
worker receives it, then followed live. The table is bounded the way the log is: a
cancellation older than the log's max age is forgotten (the log has dropped it too),
and at most `max_entries` are kept, oldest forgotten first.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractChannel
from pydantic import ValidationError

from sandfleet.common.models import CancelRequest
from sandfleet.common.signing import SignatureInvalid, SignatureVerifier
from sandfleet.common.stream_follower import LogMessage, StreamFollower
from sandfleet.common.topology import CONTROL_LOG_QUEUE

log = logging.getLogger(__name__)

OnCancel = Callable[[CancelRequest], Awaitable[None]]

MAX_ENTRIES = 100_000


class CancellationLog:
    def __init__(
        self,
        channel: AbstractChannel,
        *,
        max_age_seconds: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        self._channel = channel
        # None: unsigned cancellations count (SANDFLEET_ALLOW_UNSIGNED_JOBS, no keys).
        self._verifier = verifier
        self._max_age = max_age_seconds
        self._max_entries = max_entries
        self._clock = clock
        # job id -> (the request, when it counts from), oldest first
        self._requests: OrderedDict[str, tuple[CancelRequest, float]] = OrderedDict()
        self._on_cancel: OnCancel | None = None

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, job_id: str) -> CancelRequest | None:
        self._forget_expired()
        found = self._requests.get(job_id)
        if found is None or found[1] < self._clock() - self._max_age:
            return None
        return found[0]

    async def start(self, on_cancel: OnCancel) -> None:
        """Read every past cancellation; then call `on_cancel` for each new one."""
        self._on_cancel = on_cancel
        await StreamFollower(self._channel, CONTROL_LOG_QUEUE, self._on_message).start()

    def record(self, request: CancelRequest) -> bool:
        """Keep `request`; False if it is older than the log keeps anything."""
        # A requester's clock is not trusted to be behind ours: a time in the future
        # counts from now, so it is forgotten like any other.
        since = min(request.requested_at.timestamp(), self._clock())
        if since < self._clock() - self._max_age:
            return False
        self._requests[request.job_id] = (request, since)
        self._requests.move_to_end(request.job_id)
        while len(self._requests) > self._max_entries:
            self._requests.popitem(last=False)
        return True

    def _forget_expired(self) -> None:
        cutoff = self._clock() - self._max_age
        while self._requests:
            _, (_, since) = next(iter(self._requests.items()))
            if since >= cutoff:
                break
            self._requests.popitem(last=False)

    async def _on_message(self, message: LogMessage, live: bool) -> None:
        request = self._accepted(message.body)
        if request is None:
            return
        if self.record(request) and live and self._on_cancel is not None:
            await self._on_cancel(request)

    def _accepted(self, body: bytes) -> CancelRequest | None:
        """The cancellation in `body`, if it is one the gateway signed (when keys are set)."""
        try:
            request = CancelRequest.model_validate_json(body)
            if self._verifier is not None:
                self._verifier.verify(json.loads(body))
        except ValidationError:
            log.warning("skipped a %d-byte control message that is not a cancellation", len(body))
            return None
        except SignatureInvalid as exc:
            log.warning("skipped a cancellation of job %s: %s", request.job_id, exc)
            return None
        return request
