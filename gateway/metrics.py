"""The gateway's Prometheus metrics: submissions by outcome, and the depth of the queues
it knows (its submission queue and the job queues it has routed to), read from the
broker (a passive declare's message count) as each scrape begins."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from sandfleet.common.models import SubmitReply

# A queue's ready messages; None if there is no such queue.
MessageCount = Callable[[str], Awaitable[int | None]]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submissions = Counter(
            "sandfleet_submissions",
            "Submissions answered, by status (accepted, rejected, duplicate)",
            ["status"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "sandfleet_queue_messages",
            "Messages ready in a queue the gateway knows, as of the last scrape",
            ["queue"],
            registry=self.registry,
        )

    def answered(self, reply: SubmitReply) -> None:
        self.submissions.labels(status="duplicate" if reply.duplicate else reply.status.value).inc()

    async def refresh_depths(self, count: MessageCount, queues: Iterable[str]) -> None:
        """Each queue's message count; a queue deleted since is dropped from the metrics."""
        for name in sorted(queues):
            messages = await count(name)
            if messages is not None:
                self.queue_depth.labels(queue=name).set(messages)
            else:
                with contextlib.suppress(KeyError):  # never counted
                    self.queue_depth.remove(name)
