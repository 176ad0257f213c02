"""What a worker holds while it is connected to the broker, and its orderly close."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aio_pika.abc import AbstractRobustConnection

from sandfleet.common.amqp import EventSink
from sandfleet.common.event_replay import EchoedEvents
from sandfleet.workers.intake import JobIntake
from sandfleet.workers.job_runner import JobRunner
from sandfleet.workers.log_shipping import LogShipper


@dataclass
class BrokerSession:
    connection: AbstractRobustConnection
    events: EventSink
    echoed: EchoedEvents  # under `events`: closed with the connection
    runner: JobRunner
    intake: JobIntake
    logs: LogShipper
    # Jobs' output goes over a connection of its own: a job printing flat out must not
    # hold up the events and acks on `connection` (TCP back-pressure is per connection).
    logs_connection: AbstractRobustConnection

    async def aclose(self) -> None:
        """Stop echoing and shipping, then close both connections, whatever failed
        before: a robust connection left open goes on reconnecting in a task that
        ignores cancellation (aio-pika#414), and the process would never exit."""
        try:
            await self.echoed.aclose()
            await self.logs.aclose()
        finally:
            with contextlib.suppress(Exception):
                await self.logs_connection.close()
            await self.connection.close()
