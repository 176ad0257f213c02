"""The worker: one process serving one driver on one host.

    async with Worker(settings, driver, slots=2) as worker:
        await worker.serve_forever()

It declares its job queues (the driver's shared one and its host's), takes jobs
through a `JobIntake` that never holds more than its free slots, runs each through a
`JobRunner`, and publishes heartbeats. Leaving the `async with` stops taking jobs,
lets running ones finish for `drain_seconds`, then leaves the rest (by the shutdown
policy) running, for another worker of this host to take over from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
from datetime import UTC, datetime
from typing import Any, Self

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from common.amqp import EventPublisher, connect, settle
from common.errors import RetryLater
from common.events import HEARTBEAT_ALIVE, HEARTBEAT_STOPPED, Event, Phase, WorkerHealth
from common.lifecycle import AsyncCloseable
from common.models import CancelRequest
from common.settings import SandboxPolicy, Settings
from common.topology import (
    RETRY_WAITING_SINCE_HEADER,
    declare_topology,
    job_queue_name,
    job_routing_key,
    retry_queue_name,
)
from workers.cancellations import Cancellations
from workers.drivers.base import SandboxDriver, SandboxStatus
from workers.gpu.allocator import GpuAllocator
from workers.gpu.claims import GpuClaimStore, WorkerLease, worker_alive
from workers.gpu.inventory import GpuInventory, discover
from workers.intake import JobIntake
from workers.job_runner import JobRunner
from workers.journal import JobJournal, JournalEntry
from workers.reporter import WorkerIdentity

log = logging.getLogger(__name__)


def new_worker_id(host: str, driver: str) -> str:
    return f"{host}-{driver}-{os.getpid()}-{secrets.token_hex(2)}"


class Worker(AsyncCloseable):
    def __init__(
        self,
        settings: Settings,
        driver: SandboxDriver,
        *,
        slots: int = 1,
        drain_seconds: float = 30.0,
        worker_id: str | None = None,
        inventory: GpuInventory | None = None,
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
        self.inventory = inventory or discover(settings.gpu_inventory, cdi_kind=settings.cdi_kind)
        self.claims = GpuClaimStore(settings.state_dir)
        self.journal = JobJournal(settings.journal_dir, driver.kind.value)
        self._lease = WorkerLease(settings.state_dir, self.identity.worker_id)
        self._alive = functools.partial(worker_alive, settings.state_dir)
        self._gpus = GpuAllocator(
            self.inventory,
            self.claims,
            driver=driver.kind.value,
            worker_id=self.identity.worker_id,
            device_id=driver.device_id,
        )
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._intake: JobIntake | None = None
        self._runner: JobRunner | None = None
        self._events: EventPublisher | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._jobs_exchange: AbstractExchange | None = None
        self._free_gpus = len(self.inventory)
        self._started_at = datetime.now(UTC)
        self._closed = False

    async def __aenter__(self) -> Self:
        if self._closed:
            raise RuntimeError("this Worker was closed; make a new one")
        settings, kind, host = self._settings, self._driver.kind, self._settings.host
        self._lease.acquire()
        await self._reconcile()  # free GPUs of sandboxes that ended while no worker watched
        self._connection = await connect(
            settings.broker_url, name=f"sandfleet-worker {self.identity.worker_id}"
        )
        channel = self._channel = await self._connection.channel(publisher_confirms=True)
        topology = await declare_topology(
            channel, settings, job_queues=[(kind, None), (kind, host)]
        )
        self._events = EventPublisher(topology.events)
        self._cancellations = Cancellations(
            await self._connection.channel(), on_cancel=self._on_cancel
        )
        await self._cancellations.start()  # know every cancellation before taking a job
        self._jobs_exchange = topology.jobs
        self._runner = JobRunner(
            self._driver,
            self._gpus,
            self._events,
            self.identity,
            settings,
            cancelled=self._cancellations.get,
            journal=self.journal,
            bind_to_host=self._bind_to_host,
            worker_alive=self._alive,
        )
        queues = [await channel.get_queue(job_queue_name(kind, h)) for h in (None, host)]
        self._intake = JobIntake(channel, queues, slots=self._slots, handle=self._handle)
        await self._take_orphans()
        await self._intake.start()
        self._heartbeats = asyncio.create_task(self._beat())
        self._reconciler = asyncio.create_task(self._reconcile_periodically())
        log.info("worker %s consuming %s", self.identity.worker_id, [q.name for q in queues])
        return self

    async def aclose(self) -> None:
        """Idempotent. Counters stay readable afterwards."""
        if self._closed:
            return
        self._closed = True
        # Reconciliation stops first, so no take-over starts a job behind the drain's
        # back; heartbeats go on through the drain.
        await _cancel(self._reconciler)
        await self._drain()
        await _cancel(self._heartbeats)
        if self._events is not None:
            try:
                await self._heartbeat(HEARTBEAT_STOPPED)  # so it is listed as stopped, not lost
            except Exception:
                log.warning("final heartbeat not published", exc_info=True)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self._lease.release()

    async def _drain(self) -> None:
        """Stop taking jobs; give jobs in hand `drain_seconds`; then, by the shutdown
        policy, stop their sandboxes (`stop`) or leave them running (`adopt`): their
        journal entries let the next worker of this host finish them."""
        if self._intake is not None:
            await self._intake.stop_consuming()
        jobs = self._intake.in_hand if self._intake else set()
        if not jobs:
            return
        _, pending = await asyncio.wait(jobs, timeout=self._drain_seconds)
        if pending and self._settings.shutdown_policy == SandboxPolicy.STOP:
            await self._stop_running()
            _, pending = await asyncio.wait(pending, timeout=self._settings.stop_grace_seconds + 30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def serve_forever(self) -> None:
        await asyncio.Event().wait()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        assert self._runner is not None
        await settle(message, self._runner.handle, retry=self._retry_later)

    async def _resume(self, entry: JournalEntry) -> None:
        assert self._runner is not None
        try:
            await self._runner.resume(entry)
        except Exception:
            log.exception("job %s: could not finish it after taking it over", entry.job.job_id)

    async def _bind_to_host(self, message: AbstractIncomingMessage) -> None:
        """Move a job from the driver's shared queue to this host's queue (confirmed)."""
        assert self._jobs_exchange is not None
        await self._jobs_exchange.publish(
            _persistent_copy(message, message.headers or {}),
            routing_key=job_routing_key(self._driver.kind, self.identity.host),
            mandatory=True,
        )

    async def _on_cancel(self, request: CancelRequest) -> None:
        if self._runner is not None:
            await self._runner.cancel(request.job_id, request.reason)

    async def _stop_running(self) -> None:
        assert self._runner is not None
        for job_id in self._runner.active_jobs:
            log.warning("stopping job %s: the worker is shutting down", job_id)
            await self._runner.cancel(
                job_id,
                f"worker {self.identity.worker_id} shut down (SANDFLEET_SHUTDOWN_POLICY=stop)",
                reason="StoppedOnShutdown",
            )

    async def _retry_later(self, message: AbstractIncomingMessage, retry: RetryLater) -> None:
        """Park the job in its retry queue; it expires back to the queue it came from."""
        assert self._channel is not None
        headers = {
            **(message.headers or {}),
            RETRY_WAITING_SINCE_HEADER: retry.waiting_since.isoformat(),
        }
        await self._channel.default_exchange.publish(
            _persistent_copy(message, headers, expiration=retry.delay),
            routing_key=retry_queue_name(message.routing_key or self._driver.kind.value),
        )

    async def _take_orphans(self) -> None:
        """Take over the open journal entries of this host's dead workers of our driver."""
        assert self._intake is not None
        for entry in await asyncio.to_thread(
            self.journal.take_orphans, self.identity.worker_id, self._alive
        ):
            log.warning("job %s: taking it over from a worker that is gone", entry.job.job_id)
            self._intake.take_over(self._resume(entry))

    async def _reconcile(self) -> None:
        """Release the GPUs of dead workers' jobs that are over: no sandbox running and
        no open journal entry. A job with an open entry keeps its claim for whoever
        takes it over, even with no sandbox in sight: its worker may have died while the
        runtime was still creating one, which would then appear with the GPUs inside."""
        sandboxes = await self._driver.list_sandboxes()
        running = {s.job_id for s in sandboxes if s.job_id and s.status is not SandboxStatus.EXITED}
        unfinished = await asyncio.to_thread(self.journal.open_job_ids)
        for claim in await self._gpus.reconcile(running | unfinished):
            log.warning(
                "released GPUs %s of job %s: its worker %s is gone and the job is over",
                ",".join(claim.devices),
                claim.job_id,
                claim.worker_id,
            )
        self._free_gpus = await self._gpus.free_count()
        await asyncio.to_thread(self.journal.prune, self._settings.journal_retention_seconds)

    async def _reconcile_periodically(self) -> None:
        """A peer that dies is noticed here, not only when a worker next starts."""
        while True:
            await asyncio.sleep(self._settings.reconcile_seconds)
            try:
                await self._take_orphans()
                await self._reconcile()
            except Exception:
                log.warning("reconciliation failed; will retry", exc_info=True)

    def health(self) -> WorkerHealth:
        assert self._intake is not None and self._runner is not None
        return WorkerHealth(
            slots=self._intake.slots,
            free_slots=self._intake.free_slots,
            jobs_started=self._runner.started,
            jobs_finished=self._runner.finished,
            started_at=self._started_at,
            heartbeat_seconds=self._settings.heartbeat_seconds,
            gpus=[gpu.as_dict() for gpu in self.inventory],
            gpus_free=self._free_gpus,
            gpu_source=self.inventory.source,
        )

    async def _heartbeat(self, reason: str) -> None:
        assert self._events is not None
        self._free_gpus = await self._gpus.free_count()
        await self._events.publish(
            Event(
                job_id=None,
                phase=Phase.HEARTBEAT,
                reason=reason,
                driver=self.identity.driver.value,
                host=self.identity.host,
                worker_id=self.identity.worker_id,
                health=self.health(),
            )
        )

    async def _beat(self) -> None:
        while True:
            try:
                await self._heartbeat(HEARTBEAT_ALIVE)
            except Exception:
                # A broker outage must not end the heartbeat; the robust connection recovers.
                log.warning("heartbeat not published", exc_info=True)
            await asyncio.sleep(self._settings.heartbeat_seconds)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _persistent_copy(
    message: AbstractIncomingMessage,
    headers: dict[str, Any],
    *,
    expiration: float | None = None,
) -> aio_pika.Message:
    """The job message again, to publish elsewhere (its host's queue, a retry queue)."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        message_id=message.message_id,
        type=message.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
    )
