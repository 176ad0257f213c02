"""A job runner with everything around it but the broker: the in-memory driver, a real
journal and claim store in a temporary directory, and recorders for what it publishes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aio_pika.abc import HeadersType
from sandfleet_inmemory import InMemoryDriver

from sandfleet.common.events import Event, Phase
from sandfleet.common.models import CancelRequest, Job
from sandfleet.common.topology import RETRY_WAITING_SINCE_HEADER
from sandfleet.workers.attempt import RunPolicy
from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import GpuClaimStore
from sandfleet.workers.gpu.inventory import GpuInventory, from_records
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.job_runner import JobRunner
from sandfleet.workers.journal import JobJournal
from sandfleet.workers.warm_pools import WarmPools, bound_pools
from sandfleet.workers.warm_profiles import PoolProfile
from tests.support.gpus import FOUR_GPUS

WORKER = "w-test"
HOST = "h1"


class RecordedEvents:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.events.append(event)

    def of(self, job_id: str | None) -> list[Event]:
        return [e for e in self.events if e.job_id == job_id]

    def phases(self, job_id: str) -> list[Phase]:
        return [e.phase for e in self.of(job_id)]

    def last(self, job_id: str) -> Event:
        return self.of(job_id)[-1]


@dataclass
class RecordedQueues:
    bound: list[Job] = field(default_factory=list)
    parked: list[tuple[Job, float, datetime]] = field(default_factory=list)

    async def bind_to_host(self, job: Job) -> None:
        self.bound.append(job)

    async def park(self, job: Job, *, delay: float, waiting_since: datetime) -> None:
        self.parked.append((job, delay, waiting_since))


class KnownCancellations:
    def __init__(self) -> None:
        self.requests: dict[str, CancelRequest] = {}

    def get(self, job_id: str) -> CancelRequest | None:
        return self.requests.get(job_id)

    def add(self, job_id: str, reason: str = "no longer needed") -> CancelRequest:
        self.requests[job_id] = CancelRequest(job_id=job_id, reason=reason)
        return self.requests[job_id]


class Delivery:
    """A job message as a job queue delivers it; its ack is logged in `log`."""

    def __init__(
        self,
        body: bytes,
        *,
        routing_key: str,
        log: list[tuple[str, str]],
        message_id: str | None = None,
        headers: HeadersType | None = None,
    ) -> None:
        self.body, self.routing_key, self.message_id = body, routing_key, message_id
        self.headers: HeadersType = headers or {}
        self.processed = False
        self._log = log

    async def ack(self, multiple: bool = False) -> None:
        self.processed = True
        self._log.append(("ack", self.message_id or ""))


def job(
    job_id: str,
    *,
    gpus: int | None = None,
    gpu_ids: list[str] | None = None,
    timeout: int | None = None,
    command: list[str] | None = None,
    **block: Any,
) -> Job:
    template: dict[str, Any] = {"image": "none", "command": command or ["echo", job_id]}
    if timeout is not None:
        template["timeout_seconds"] = timeout
    if gpu_ids:
        block["gpu_device_ids"] = gpu_ids
    if block:
        template["driver_config"] = block
    body: dict[str, Any] = {"job_id": job_id, "driver": "inmemory", "template": template}
    if gpus:
        body["resource_requirements"] = {"gpu": {"count": gpus}}
    return Job.model_validate_json(json.dumps(body))


class RecordedShipping:
    """Each job's shipped output, read to its end when the runner ends it, and the
    job's event phases published by then."""

    def __init__(self, events: RecordedEvents) -> None:
        self._events = events
        self._following: dict[str, AsyncIterator[bytes]] = {}
        self.output: dict[str, bytes] = {}
        self.phases_at_end: dict[str, list[Phase]] = {}

    def begin(self, job_id: str, output: AsyncIterator[bytes]) -> None:
        self._following[job_id] = output

    async def end(self, job_id: str) -> None:
        self.phases_at_end[job_id] = self._events.phases(job_id)
        following = self._following.pop(job_id, None)
        if following is None:
            return
        # Cut off as LogShipper cuts off a stream that does not end (a sandbox that runs
        # on after an error): an ended sandbox's stream ends at once.
        chunks: list[bytes] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for chunk in following:
                    chunks.append(chunk)
        self.output[job_id] = b"".join(chunks)


@dataclass
class Harness:
    runner: JobRunner
    driver: InMemoryDriver
    journal: JobJournal
    claims: GpuClaimStore
    events: RecordedEvents
    queues: RecordedQueues
    cancellations: KnownCancellations
    alive: set[str]
    inventory: GpuInventory
    logs: RecordedShipping
    warm: WarmPools

    @property
    def calls(self) -> list[tuple[str, str]]:
        """The driver's operations and the message acks, in order."""
        return self.driver.calls

    def delivery(self, job: Job, *, shared: bool = False, waiting_since: str = "") -> Delivery:
        headers: HeadersType = {RETRY_WAITING_SINCE_HEADER: waiting_since} if waiting_since else {}
        return Delivery(
            job.model_dump_json().encode(),
            routing_key="inmemory" if shared else f"inmemory.{HOST}",
            log=self.driver.calls,
            message_id=job.job_id,
            headers=headers,
        )

    def gpus_held(self) -> dict[str, tuple[str, ...]]:
        return {claim.job_id: claim.gpus for claim in self.claims.claims()}


def harness(
    tmp_path: Path,
    *,
    policy: RunPolicy | None = None,
    warm: Sequence[PoolProfile] = (),
    refill_after_take_seconds: float = 0,
) -> Harness:
    """`warm`: the runner's pools (not filled: a test fills them with `warm.start()`)."""
    driver = InMemoryDriver()
    alive = {WORKER}
    is_alive: Callable[[str], bool] = alive.__contains__
    pools = WarmPools(
        driver,
        bound_pools(driver, list(warm)),
        worker_id=WORKER,
        alive=is_alive,
        refill_after_take_seconds=refill_after_take_seconds,
    )
    journal = JobJournal(tmp_path / "journal", driver.name, alive=is_alive)
    claims = GpuClaimStore(tmp_path / "state")
    inventory = GpuInventory(from_records(FOUR_GPUS["gpus"]), source="test")
    events, queues, cancellations = RecordedEvents(), RecordedQueues(), KnownCancellations()
    logs = RecordedShipping(events)
    runner = JobRunner(
        driver,
        identity=WorkerIdentity(worker_id=WORKER, driver=driver.name, host=HOST),
        gpus=GpuAllocator(
            inventory, claims, driver=driver.name, worker_id=WORKER, device_id=driver.device_id
        ),
        journal=journal,
        events=events,
        queues=queues,
        cancellations=cancellations,
        policy=policy or RunPolicy(stop_grace_seconds=0, gpu_retry_seconds=7),
        logs=logs,
        warm=pools,
    )
    return Harness(
        runner, driver, journal, claims, events, queues, cancellations, alive, inventory, logs,
        pools,
    )  # fmt: skip
