"""The worker: one process serving one driver on one host.

    async with Worker(settings, driver, slots=2) as worker:
        await worker.serve_forever()

It declares its job queues (the driver's shared one and its host's), takes jobs
through a `JobIntake` that never holds more than its free slots, runs each through a
`JobRunner`, and publishes heartbeats. Leaving the `async with` stops taking jobs,
lets running ones finish for `drain_seconds`, then leaves the rest to be redelivered
and adopted by the next worker on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from common.amqp import EventPublisher, connect, settle
from common.events import Event, Phase, WorkerHealth
from common.settings import Settings
from common.topology import declare_topology, job_queue_name
from workers.drivers.base import SandboxDriver
from workers.intake import JobIntake
from workers.job_runner import JobRunner
from workers.reporter import WorkerIdentity

log = logging.getLogger(__name__)


def new_worker_id(host: str, driver: str) -> str:
    return f"{host}-{driver}-{os.getpid()}-{secrets.token_hex(2)}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        driver: SandboxDriver,
        *,
        slots: int = 1,
        drain_seconds: float = 30.0,
        worker_id: str | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        self._settings = settings
        self._driver = driver
        self._slots = slots
        self._drain_seconds = drain_seconds
        self.identity = WorkerIdentity(
            worker_id=worker_id or new_worker_id(settings.host, driver.kind.value),
            driver=driver.kind,
            host=settings.host,
        )
        self._connection: AbstractRobustConnection | None = None
        self._intake: JobIntake | None = None
        self._runner: JobRunner | None = None
        self._events: EventPublisher | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._started_at = datetime.now(UTC)
        self._closed = False

    async def __aenter__(self) -> Self:
        if self._closed:
            raise RuntimeError("this Worker was closed; make a new one")
        settings, kind, host = self._settings, self._driver.kind, self._settings.host
        self._connection = await connect(
            settings.broker_url, name=f"sandfleet-worker {self.identity.worker_id}"
        )
        channel: AbstractChannel = await self._connection.channel(publisher_confirms=True)
        topology = await declare_topology(
            channel, settings, job_queues=[(kind, None), (kind, host)]
        )
        self._events = EventPublisher(topology.events)
        self._runner = JobRunner(self._driver, self._events, self.identity, settings)
        queues = [await channel.get_queue(job_queue_name(kind, h)) for h in (None, host)]
        self._intake = JobIntake(channel, queues, slots=self._slots, handle=self._handle)
        await self._intake.start()
        self._heartbeat = asyncio.create_task(self._beat())
        log.info("worker %s consuming %s", self.identity.worker_id, [q.name for q in queues])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Idempotent. Counters stay readable afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._intake is not None:
            await self._intake.drain(self._drain_seconds)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def serve_forever(self) -> None:
        await asyncio.Event().wait()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        assert self._runner is not None
        await settle(message, self._runner.handle)

    def health(self) -> WorkerHealth:
        assert self._intake is not None and self._runner is not None
        return WorkerHealth(
            slots=self._intake.slots,
            free_slots=self._intake.free_slots,
            jobs_started=self._runner.started,
            jobs_finished=self._runner.finished,
            started_at=self._started_at,
            heartbeat_seconds=self._settings.heartbeat_seconds,
        )

    async def _beat(self) -> None:
        assert self._events is not None
        while True:
            try:
                await self._events.publish(
                    Event(
                        job_id=None,
                        phase=Phase.HEARTBEAT,
                        reason="Alive",
                        driver=self.identity.driver.value,
                        host=self.identity.host,
                        worker_id=self.identity.worker_id,
                        health=self.health(),
                    )
                )
            except Exception:
                # A broker outage must not end the heartbeat; the robust connection recovers.
                log.warning("heartbeat not published", exc_info=True)
            await asyncio.sleep(self._settings.heartbeat_seconds)
