"""The worker: one process serving one driver on one host.

    async with Worker(settings, driver, slots=2) as worker:
        await worker.serve_forever()

Making one loads the keys it trusts (SANDFLEET_TRUSTED_KEYS): every job must carry the
gateway's signature, checked before anything else is done with it; a worker with no
keys refuses to be made unless unsigned jobs are allowed explicitly.

Entering it takes the worker's lease on this host, frees the GPUs of jobs that ended
while no worker watched, connects, declares its job queues (the driver's shared one
and its host's), reads every past cancellation, takes over the jobs of this host's
dead workers of its driver, and starts taking jobs through a `JobIntake` that never
holds more than its free slots; each job runs through the `JobRunner`. While it runs
it publishes heartbeats and, every `reconcile_seconds`, takes over the jobs of peers
that died and frees the GPUs of jobs that are over.

Leaving it stops taking jobs, lets jobs in hand finish for `drain_seconds`, then, by
the shutdown policy, stops their sandboxes or leaves them running for the next worker
of this host to take over; a last heartbeat says it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
from datetime import UTC, datetime
from functools import partial
from typing import Any, Self

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from sandfleet.common.amqp import connect, settle
from sandfleet.common.cluster_start import start_when_cluster_ready
from sandfleet.common.event_publisher import EventPublisher
from sandfleet.common.event_replay import EchoedEvents, fresh_events
from sandfleet.common.events import HEARTBEAT_ALIVE, HEARTBEAT_STOPPED, Phase, WorkerHealth
from sandfleet.common.lifecycle import AsyncCloseable, cancel_and_wait, every
from sandfleet.common.metrics import consuming_on
from sandfleet.common.settings import SandboxPolicy, Settings
from sandfleet.common.topology import (
    LOGS_EXCHANGE,
    RETRY_EXCHANGE,
    declare_worker_queues,
    existing_topology,
    job_queue_name,
    job_routing_key,
)
from sandfleet.workers.attempt import RunPolicy, StopRequest
from sandfleet.workers.broker_session import BrokerSession
from sandfleet.workers.cancellations import CancellationLog
from sandfleet.workers.drivers.base import SandboxDriver, SandboxStatus
from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import GpuClaimStore, WorkerLease, worker_alive
from sandfleet.workers.gpu.inventory import GpuInventory, discover
from sandfleet.workers.gpu_health import GpuHealth
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.intake import JobIntake
from sandfleet.workers.job_queues import HostJobQueues
from sandfleet.workers.job_runner import JobRunner
from sandfleet.workers.job_signatures import SignedJobsOnly, job_verifier
from sandfleet.workers.journal import JobJournal, JournalEntry
from sandfleet.workers.log_shipping import LogShipper
from sandfleet.workers.metrics import CountedEvents, WorkerMetrics
from sandfleet.workers.slots import Slots
from sandfleet.workers.warm_pools import WarmPools, bound_pools
from sandfleet.workers.warm_profiles import PoolProfile, warm_profiles

log = logging.getLogger(__name__)


def new_worker_id(host: str, driver: str) -> str:
    return f"{host}-{driver}-{os.getpid()}-{secrets.token_hex(2)}"


class Worker(AsyncCloseable):
    def __init__(
        self,
        settings: Settings,
        driver: SandboxDriver[Any],
        *,
        slots: int = 1,
        drain_seconds: float = 30.0,
        worker_id: str | None = None,
        inventory: GpuInventory | None = None,
        warm: list[PoolProfile] | None = None,
    ) -> None:
        self._settings = settings
        self._driver = driver
        # First, so a worker that would run unsigned jobs by accident never starts.
        self._verifier = job_verifier(settings)
        self.slots = Slots(slots)
        self._drain_seconds = drain_seconds
        self.identity = WorkerIdentity(
            worker_id=worker_id or new_worker_id(settings.host, driver.name),
            driver=driver.name,
            host=settings.host,
        )
        self.inventory = inventory or discover(settings.gpu_inventory, cdi_kind=settings.cdi_kind)
        self.claims = GpuClaimStore(settings.state_dir)
        self.gpu_health = GpuHealth(settings, self.inventory, self.claims, self.identity)
        alive = functools.partial(worker_alive, settings.state_dir)
        self.journal = JobJournal(settings.journal_dir, driver.name, alive=alive)
        self._lease = WorkerLease(settings.state_dir, self.identity.worker_id)
        self._gpus = GpuAllocator(
            self.inventory,
            self.claims,
            driver=driver.name,
            worker_id=self.identity.worker_id,
            device_id=driver.device_id,
            # Optional: a driver without it (a VM's passthrough) is given no MIG instance.
            mig_device_id=getattr(driver, "mig_device_id", None),
        )
        self._policy = RunPolicy(
            stop_grace_seconds=settings.stop_grace_seconds,
            output_tail_lines=settings.output_tail_lines,
            gpu_retry_seconds=settings.gpu_retry_seconds,
            gpu_max_wait_seconds=settings.gpu_max_wait_seconds,
            takeover=settings.takeover_policy,
            max_timeout_seconds=settings.max_timeout_seconds,
        )
        profiles = warm_profiles(settings.warm_pools, []) if warm is None else warm
        self.warm = WarmPools(
            driver,
            bound_pools(driver, profiles),  # first: a bad profile refuses the worker
            worker_id=self.identity.worker_id,
            alive=alive,
        )
        self.metrics = WorkerMetrics(self.slots, self.inventory, self.claims, self.warm)
        self._connected: BrokerSession | None = None
        self._consuming = False
        self._heartbeats: asyncio.Task[None] | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._free_gpus = len(self._gpus.topology.whole)  # until first counted
        self._started_at = datetime.now(UTC)
        self._closed = False

    async def __aenter__(self) -> Self:
        if self._closed:
            raise RuntimeError("this Worker was closed; make a new one")
        self._lease.acquire()
        await self._reconcile()  # free GPUs of sandboxes that ended while no worker watched
        await self.warm.start()  # filled while the worker connects
        try:
            connected = self._connected = await start_when_cluster_ready(self._connect, _nothing)
            await self._take_over_unwatched()
            await connected.intake.start()
        except BaseException:
            try:
                await self.warm.aclose()  # its refilling stops, its sandboxes go
            finally:
                if self._connected is not None:
                    await self._connected.aclose()
                self._lease.release()
            raise
        self._consuming = True
        settings = self._settings
        self._heartbeats = asyncio.create_task(every(settings.heartbeat_seconds, self._beat))
        self.gpu_health.start()  # the NVML watcher, where NVML is present
        self._reconciler = asyncio.create_task(
            every(settings.reconcile_seconds, self._reconcile_unwatched, wait_first=True)
        )
        log.info("worker %s consuming %s", self.identity.worker_id, self._queue_names())
        return self

    async def aclose(self) -> None:
        """Idempotent. Counters stay readable afterwards."""
        if self._closed:
            return
        self._closed = True
        self._consuming = False
        try:
            # Reconciliation stops first, so no take-over starts a job behind the
            # drain's back; heartbeats go on through the drain.
            await cancel_and_wait(self._reconciler)
            if self._connected is not None:
                await self._drain(self._connected)
            await self.warm.aclose()
            await cancel_and_wait(self._heartbeats)
            await self.gpu_health.aclose()
        finally:  # whatever failed above, the connections close (BrokerSession.aclose)
            if self._connected is not None:
                with contextlib.suppress(Exception):  # logged by the publisher's retries
                    await self._heartbeat(HEARTBEAT_STOPPED)  # listed as stopped, not lost
                await self._connected.aclose()
            self._lease.release()

    @property
    def healthy(self) -> bool:
        """Taking jobs: connected, the job queues' channel open, not draining (`/healthz`)."""
        session = self._connected
        if session is None or not self._consuming:
            return False
        return consuming_on(session.connection, session.intake.channel)

    async def serve_forever(self) -> None:
        await asyncio.Event().wait()

    @property
    def runner(self) -> JobRunner:
        return self._online().runner

    def _online(self) -> BrokerSession:
        if self._connected is None:
            raise RuntimeError("use the Worker inside 'async with'")
        return self._connected

    async def _connect(self) -> BrokerSession:
        """Connected and subscribed; nothing left open if that fails."""
        settings, worker_id = self._settings, self.identity.worker_id
        connection = await connect(
            settings.broker_url, name=f"sandfleet-worker {worker_id}", settings=settings
        )
        try:
            logs_connection = await connect(
                settings.broker_url, name=f"sandfleet-worker {worker_id} logs", settings=settings
            )
        except BaseException:
            await connection.close()
            raise
        try:
            return await self._subscribe(connection, logs_connection)
        except BaseException:
            await logs_connection.close()
            await connection.close()
            raise

    async def _subscribe(
        self, connection: AbstractRobustConnection, logs_connection: AbstractRobustConnection
    ) -> BrokerSession:
        settings, name, host = self._settings, self._driver.name, self._settings.host
        # A returned job (bound to the host, parked) raises: it must not vanish unseen.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_worker_queues(connection, driver=name, host=host)
        topology = await existing_topology(channel)
        # Echoed beneath the count: a repeat was counted when first published.
        pack = self._settings.pack_events
        echoed = EchoedEvents(
            EventPublisher(topology.events, pack=pack),
            partial(fresh_events, connection, pack=pack),
        )
        events = CountedEvents(echoed, self.metrics.jobs)
        logs = await self._log_shipper(logs_connection)
        cancellations = CancellationLog(
            await connection.channel(),
            max_age_seconds=settings.events_max_age_seconds,
            verifier=self._verifier,
        )
        runner = JobRunner(
            self._driver,
            identity=self.identity,
            gpus=self._gpus,
            journal=self.journal,
            events=events,
            queues=HostJobQueues(
                topology.jobs, await channel.get_exchange(RETRY_EXCHANGE), driver=name, host=host
            ),
            cancellations=cancellations,
            policy=self._policy,
            logs=logs,
            warm=self.warm,
        )
        await cancellations.start(runner.cancel)  # know every cancellation before taking a job

        signed_only = SignedJobsOnly(
            self._verifier, runner.handle, identity=self.identity, events=events
        )
        signed_only.say_what_runs()

        async def handle(message: AbstractIncomingMessage) -> None:
            await settle(message, signed_only)

        queues = [await channel.get_queue(name) for name in self._queue_names()]
        intake = JobIntake(channel, queues, self.slots, handle)
        await echoed.__aenter__()  # last: nothing after it can fail and leave it running
        return BrokerSession(
            connection=connection,
            events=events,
            echoed=echoed,
            runner=runner,
            intake=intake,
            logs=logs,
            logs_connection=logs_connection,
        )

    async def _log_shipper(self, connection: AbstractRobustConnection) -> LogShipper:
        channel = await connection.channel(publisher_confirms=True)
        return LogShipper(
            await channel.get_exchange(LOGS_EXCHANGE),  # passive: needs no permission
            routing_key=job_routing_key(self._driver.name, self._settings.host),
            max_bytes_per_job=self._settings.max_log_bytes_per_job,
        )

    def _queue_names(self) -> list[str]:
        name = self._driver.name
        return [job_queue_name(name), job_queue_name(name, self._settings.host)]

    async def _drain(self, connected: BrokerSession) -> None:
        """Stop taking jobs; give jobs in hand `drain_seconds`; then, by the shutdown
        policy, stop their sandboxes (`stop`) or leave them running (`adopt`): their
        journal entries let the next worker of this host finish them."""
        await connected.intake.stop()
        jobs = connected.intake.in_hand
        if not jobs:
            return
        _, pending = await asyncio.wait(jobs, timeout=self._drain_seconds)
        if pending and self._settings.shutdown_policy is SandboxPolicy.STOP:
            await self._stop_jobs_in_hand(connected.runner)
            _, pending = await asyncio.wait(pending, timeout=self._settings.stop_grace_seconds + 30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _stop_jobs_in_hand(self, runner: JobRunner) -> None:
        message = f"worker {self.identity.worker_id} shut down (SANDFLEET_SHUTDOWN_POLICY=stop)"
        await runner.stop_running(StopRequest(Phase.CANCELLED, "StoppedOnShutdown", message))

    async def _take_over_unwatched(self) -> None:
        """Take over the open journal entries of this host's dead workers of our driver,
        and this worker's own that no task of it runs (a run that ended in an error, a
        clean-up the runtime refused): each is finished and cleaned up."""
        connected, me = self._online(), self.identity.worker_id
        for entry in await asyncio.to_thread(self.journal.take_over_dead, me):
            log.warning("job %s: taking it over from a worker that is gone", entry.job.job_id)
        for entry in await asyncio.to_thread(self.journal.open_entries, me):
            if not connected.runner.working_on(entry.job.job_id):
                connected.intake.run_taken_over(self._finish_taken_over(connected.runner, entry))

    @staticmethod
    async def _finish_taken_over(runner: JobRunner, entry: JournalEntry) -> None:
        try:
            await runner.take_over(entry)
        except Exception:
            log.exception("job %s: could not finish it after taking it over", entry.job.job_id)

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

    async def _reconcile_unwatched(self) -> None:
        """A peer that dies is noticed here, not only when a worker next starts."""
        await self._take_over_unwatched()
        await self._reconcile()
        await self.warm.remove_unowned()

    def health(self) -> WorkerHealth:
        runner = self._online().runner
        return WorkerHealth(
            slots=self.slots.capacity,
            free_slots=self.slots.free,
            jobs_started=runner.started,
            jobs_finished=runner.finished,
            started_at=self._started_at,
            heartbeat_seconds=self._settings.heartbeat_seconds,
            gpus=self.gpu_health.rows(),  # with each GPU's health and drain state
            gpus_free=self._free_gpus,
            gpu_source=self.inventory.source,
            gpu_health_source=self.gpu_health.source,
            warm_pools=self.warm.health(),
            jobs_warm=self.warm.served_warm,
            jobs_cold=self.warm.served_cold,
        )

    async def _beat(self) -> None:
        try:  # jobs on GPUs turned unhealthy are told (stopped by setting); then the beat
            await self.gpu_health.check(self.runner, self._online().events)
        finally:
            await self._heartbeat(HEARTBEAT_ALIVE)

    async def _heartbeat(self, reason: str) -> None:
        self._free_gpus = await self._gpus.free_count()
        event = self.identity.event(None, Phase.HEARTBEAT, reason, health=self.health())
        await self._online().events.publish(event)


async def _nothing() -> None:
    """Nothing to undo: `_connect` leaves nothing open when it fails."""
