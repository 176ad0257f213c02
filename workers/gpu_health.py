"""A worker's side of GPU health: it runs the NVML watcher (where NVML is present), gives
its heartbeats each GPU's health and drain state, and, every heartbeat, tells its jobs
in hand whose GPUs turned unhealthy.

Such a job gets one note, a `running` event with reason `GpuUnhealthy` naming the GPUs
and why (a note of the phase it is in: no new phase, which brokers set up before it
would refuse to carry and older readers could not parse); with
SANDFLEET_GPU_UNHEALTHY_ACTION=stop it is then stopped, and fails with reason
`GpuUnhealthy`. A job not yet started is noted once it starts (or stopped at once).
A drained GPU's jobs run on: a drain only keeps new claims away.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from sandfleet.common.amqp import EventSink
from sandfleet.common.events import Phase
from sandfleet.common.lifecycle import cancel_and_wait
from sandfleet.common.settings import GpuUnhealthyAction, Settings
from sandfleet.workers.attempt import Attempt, StopRequest
from sandfleet.workers.gpu.claims import Claim, GpuClaimStore
from sandfleet.workers.gpu.health import GpuStates
from sandfleet.workers.gpu.health_watch import nvml_watch, watch_gpu_health
from sandfleet.workers.gpu.inventory import GpuInventory
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.stage_timings import STARTED

GPU_UNHEALTHY = "GpuUnhealthy"


class JobsInHand(Protocol):
    def in_hand(self, job_id: str) -> Attempt | None: ...

    async def stop(self, job_id: str, request: StopRequest) -> None: ...


class GpuHealth:
    def __init__(
        self,
        settings: Settings,
        inventory: GpuInventory,
        store: GpuClaimStore,
        identity: WorkerIdentity,
    ) -> None:
        self._inventory = inventory
        self._store = store
        self._identity = identity
        self._action = settings.gpu_unhealthy_action
        self._seconds = settings.gpu_health_seconds
        self._watcher: asyncio.Task[None] | None = None
        self._noted: set[str] = set()  # jobs told of their unhealthy GPUs
        self.states = GpuStates()  # as last read

    def start(self, nvml: Any = None) -> None:
        """The NVML watcher, if NVML is there (`nvml`: a stand-in for pynvml, for tests)."""
        watch = nvml_watch([gpu.uuid for gpu in self._inventory], nvml)
        if watch is not None:
            self._watcher = asyncio.create_task(watch_gpu_health(watch, self._store, self._seconds))

    async def aclose(self) -> None:
        await cancel_and_wait(self._watcher)

    @property
    def source(self) -> str:
        """What marks GPUs unhealthy here: "nvml" (the watcher runs) or "none"."""
        return "nvml" if self._watcher is not None and not self._watcher.done() else "none"

    def rows(self) -> list[dict[str, Any]]:
        """The heartbeat's GPUs: each GPU's inventory record, health and drain state."""
        return [{**gpu.as_dict(), **self.states.row(gpu.uuid)} for gpu in self._inventory]

    async def check(self, jobs: JobsInHand, events: EventSink) -> None:
        """Read the states; tell (and by setting stop) jobs in hand on unhealthy GPUs."""
        self.states = await asyncio.to_thread(self._store.states)
        claims = await asyncio.to_thread(self._store.claims)
        sick = self._sick_jobs(claims)
        self._noted &= sick.keys()  # a job gone (or its GPU healthy again) is forgotten
        for job_id, message in sick.items():
            if job_id not in self._noted:
                await self._tell(jobs, events, job_id, message)

    def _sick_jobs(self, claims: list[Claim]) -> dict[str, str]:
        """This worker's jobs holding an unhealthy GPU -> what to tell them."""
        me, unhealthy = self._identity, self.states.unhealthy
        sick = {}
        for claim in claims:
            if claim.driver != me.driver or claim.worker_id != me.worker_id:
                continue
            # A MIG instance is as sick as its GPU (the watcher marks whole GPUs).
            held = zip(claim.gpus, claim.physical, strict=True)
            bad = {gpu: unhealthy.get(gpu) or unhealthy[parent] for gpu, parent in held
                   if gpu in unhealthy or parent in unhealthy}  # fmt: skip
            if bad:
                sick[claim.job_id] = "; ".join(
                    f"GPU {gpu} is unhealthy: {mark.reason}" for gpu, mark in bad.items()
                )
        return sick

    async def _tell(self, jobs: JobsInHand, events: EventSink, job_id: str, message: str) -> None:
        attempt = jobs.in_hand(job_id)
        if attempt is None or attempt.stop_request is not None:
            return
        started = STARTED in attempt.entry.stage_marks
        if started:
            await events.publish(attempt.event(Phase.RUNNING, GPU_UNHEALTHY, message))
        if self._action is GpuUnhealthyAction.STOP:
            await jobs.stop(job_id, StopRequest(Phase.FAILED, GPU_UNHEALTHY, message))
        if started or self._action is GpuUnhealthyAction.STOP:
            self._noted.add(job_id)
