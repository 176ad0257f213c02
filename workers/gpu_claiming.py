"""Claiming a job's GPUs, all or none: the `claimed` event, or the job parked
(RetryLater) while they are busy, or `Unschedulable` once it has waited too long.

A job asking for a drained or unhealthy GPU by name waits like one asking for a busy
GPU (reason `GpusUnavailable`): a drain is mostly a maintenance window, and the wait is
bounded by SANDFLEET_GPU_MAX_WAIT_SECONDS all the same."""

from __future__ import annotations

from datetime import UTC, datetime

from sandfleet.common.errors import RetryLater, Unschedulable
from sandfleet.common.events import GpuPlacement, Phase
from sandfleet.workers.attempt import Attempt, RunPolicy
from sandfleet.workers.gpu.allocator import GpuAllocator, GpuRequest
from sandfleet.workers.gpu.claims import Claim, GpuBusy, GpuUnavailable, NotEnoughGpus
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.stage_timings import CLAIMED
from sandfleet.workers.supervision import Emit


class GpuClaiming:
    """`emit(attempt, phase, reason, message)` publishes one of the job's events."""

    def __init__(
        self, gpus: GpuAllocator, identity: WorkerIdentity, policy: RunPolicy, emit: Emit
    ) -> None:
        self._gpus = gpus
        self._identity = identity
        self._policy = policy
        self._emit = emit

    async def claim(self, attempt: Attempt, request: GpuRequest) -> Claim | None:
        """All the job's GPUs or none; busy ones park the job (RetryLater)."""
        if request.count == 0:
            return None
        capacity = self._gpus.capacity(request)
        if request.count > capacity:
            host = self._identity.host
            what = (
                f"MIG instances of profile {request.mig_profile}"
                if request.mig_profile
                else "GPU(s)"
            )
            raise Unschedulable(f"{request.count} {what} wanted; host {host} has {capacity}")
        try:
            claim, placement = await self._gpus.claim_placed(attempt.job_id, request)
        except (GpuBusy, GpuUnavailable, NotEnoughGpus) as exc:
            raise await self._busy(attempt, exc) from exc
        attempt.devices = claim.devices
        attempt.placement = GpuPlacement(gpus=list(claim.gpus), why=placement.why)
        attempt.mark(CLAIMED)
        message = "physical GPUs " + ", ".join(claim.gpus)
        if placement.why not in {"exact", "kept"}:  # chosen here: say why these
            message += f" ({placement.why})"
        await self._emit(attempt, Phase.CLAIMED, "GpusClaimed", message)
        return claim

    async def _busy(self, attempt: Attempt, busy: Exception) -> RetryLater | Unschedulable:
        """The job waits (parked), or, after waiting too long, fails `Unschedulable`."""
        now = datetime.now(UTC)
        since = attempt.entry.waiting_since or now
        waited, limit = (now - since).total_seconds(), self._policy.gpu_max_wait_seconds
        if waited >= limit:
            return Unschedulable(
                f"no GPUs after waiting {waited:.0f}s (limit {limit:.0f}s): {busy}"
            )
        reason = "GpusUnavailable" if isinstance(busy, GpuUnavailable) else "GpusBusy"
        await self._emit(attempt, Phase.WAITING, reason, str(busy))
        return RetryLater(str(busy), delay=self._policy.gpu_retry_seconds, waiting_since=since)
