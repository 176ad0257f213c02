"""One job's life on a worker, as named steps:

    take       decode the job, check its driver block and GPUs (a bad one: `rejected`,
               dead-lettered; job_check.py); a job from the driver's shared queue is
               bound to this host's queue instead, and taken from there
    hand off   the host's journal takes the job, then the message is acked: one step,
               idempotent (a second delivery finds the entry and is dropped)
    obtain     its one sandbox: found and adopted (made by a worker now gone), or, with
               GPUs claimed, created; or an outcome without one (cancelled before it
               started, sandbox lost); or parked until its GPUs are free
    supervise  start it, wait for it within its timeout; a stop request ends it early
               (supervision.py)
    finish     end its output on the log stream (log_shipping.py), record the terminal
               outcome in the journal, then publish it
    clean up   remove the sandbox, release its GPUs, close the journal entry

From the hand-off on, the journal owns the job: no message is held while a sandbox
runs (a long job would outlive the broker's consumer timeout). A worker that dies
leaves the entry for the next worker of this host to take over, which enters the
same steps at `obtain` (or re-publishes a recorded terminal event and cleans up); so
does this worker's reconciler for an entry of its own whose run ended in an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from sandfleet.common.amqp import BROKER_UNAVAILABLE, EventSink
from sandfleet.common.errors import (
    RequestInvalid,
    RetryLater,
    SandboxError,
    SandboxNameTaken,
)
from sandfleet.common.events import Phase
from sandfleet.common.models import CancelRequest, Job
from sandfleet.common.topology import job_routing_key
from sandfleet.workers.attempt import Attempt, JobPlan, Outcome, RunPolicy, StopRequest
from sandfleet.workers.drivers.base import (
    ClaimedGpu,
    SandboxDriver,
    SandboxSpec,
    SandboxState,
)
from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import Claim
from sandfleet.workers.gpu_claiming import GpuClaiming
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.job_check import JobCheck, JobMessage
from sandfleet.workers.job_queues import JobQueues, waiting_since
from sandfleet.workers.journal import AlreadyFinished, JobJournal, JournalEntry, OwnedByLiveWorker
from sandfleet.workers.log_shipping import OutputShipping
from sandfleet.workers.stage_timings import CREATED, CREATING
from sandfleet.workers.supervision import SandboxSupervisor
from sandfleet.workers.warm_pools import WarmPools

log = logging.getLogger(__name__)


class UserCancellations(Protocol):
    def get(self, job_id: str) -> CancelRequest | None: ...


class JobRunner:
    def __init__(
        self,
        driver: SandboxDriver[Any],
        *,
        identity: WorkerIdentity,
        gpus: GpuAllocator,
        journal: JobJournal,
        events: EventSink,
        queues: JobQueues,
        cancellations: UserCancellations,
        policy: RunPolicy,
        logs: OutputShipping,
        warm: WarmPools,
    ) -> None:
        self._driver = driver
        self._warm = warm
        self._logs = logs
        self._identity = identity
        self._gpus = gpus
        self._journal = journal
        self._events = events
        self._queues = queues
        self._cancellations = cancellations
        self._policy = policy
        self._supervisor = SandboxSupervisor(driver, self._emit, policy, self._ship_output)
        self._claiming = GpuClaiming(gpus, identity, policy, self._emit)
        self._check = JobCheck(driver, gpus, identity, events)
        self._in_hand: dict[str, Attempt] = {}
        # Jobs being handed off, run or taken over here, counted from before the journal
        # takes them, so the reconciler never takes over a job this worker is running.
        self._working: Counter[str] = Counter()
        self.started = 0
        self.finished = 0

    def working_on(self, job_id: str) -> bool:
        return self._working[job_id] > 0

    def in_hand(self, job_id: str) -> Attempt | None:
        return self._in_hand.get(job_id)

    # ---- the ways in: a delivery, a dead worker's job, a stop ----

    async def handle(self, message: JobMessage) -> None:
        """A job queue's delivery; `sandfleet.common.amqp.settle` answers the broker."""
        job, plan = await self._check.take(message)
        if message.routing_key == job_routing_key(job.driver):  # the driver's shared queue
            await self._queues.bind_to_host(job)  # then settle acks the shared copy
            return
        with self._working_on(job.job_id):
            attempt = await self._hand_off(message, job, plan)
            if attempt is not None:
                await self._run(attempt)

    async def take_over(self, entry: JournalEntry) -> None:
        """Finish a job from its journal entry, now this worker's: a dead worker's, or
        this worker's own whose run ended in an error. Nothing if the job is being run
        here, or has ended or changed hands since `entry` was read."""
        job_id = entry.job.job_id
        if self.working_on(job_id):
            return
        with self._working_on(job_id):
            current = await asyncio.to_thread(self._journal.read, job_id)
            if current is None or current.closed or current.owner != self._identity.worker_id:
                return
            if current.parked:  # its copy may be back in the broker, or have taken it
                current = await asyncio.to_thread(self._journal.unpark, job_id, current.owner)
                if current is None:
                    return
            attempt = Attempt(current, self._identity, plan=None)
            if current.terminal is None:
                await self._run(attempt)
                return
            # It ended, and may not have said so: say it again under the same event_id.
            await self._events.publish(current.terminal)
            await self._clean_up(attempt)

    async def cancel(self, request: CancelRequest) -> None:
        """A user's cancellation, live; jobs not in hand find it in the cancellation log."""
        await self.stop(request.job_id, StopRequest.cancelled(request.reason))

    async def stop_running(self, request: StopRequest) -> None:
        """Stop every job in hand that has a sandbox (the shutdown policy `stop`); one
        still being created is left for the next worker to take over."""
        for job_id, attempt in list(self._in_hand.items()):
            if attempt.sandbox_id is not None:
                log.warning("stopping job %s: %s", job_id, request.message)
                await self.stop(job_id, request)

    async def stop(self, job_id: str, request: StopRequest) -> None:
        """End a job in hand early: its terminal event says `request`. A sandbox being
        created is not waited for: its create is cancelled, and the job ends before start."""
        attempt = self._in_hand.get(job_id)
        if attempt is None or attempt.stop_request is not None:
            return
        attempt.request_stop(request)
        if attempt.sandbox_id is not None:
            try:
                await self._supervisor.stop_sandbox(attempt.sandbox_id)
            except Exception:  # of any kind: the caller (the control log, a shutdown) goes on
                log.exception("job %s: stopping its sandbox failed; it runs on", job_id)

    # ---- the steps ----

    async def _hand_off(self, message: JobMessage, job: Job, plan: JobPlan) -> Attempt | None:
        try:
            entry = await asyncio.to_thread(
                self._journal.take,
                job,
                self._identity.worker_id,
                waiting_since=waiting_since(message.headers),
            )
        except (OwnedByLiveWorker, AlreadyFinished) as exc:
            log.warning("job %s: dropping a duplicate delivery (%s)", job.job_id, exc)
            return None  # settle acks it
        try:
            await message.ack()
        except BROKER_UNAVAILABLE as exc:
            # The journal owns the job now: the broker redelivers the message, and that
            # copy finds this worker running it and is dropped.
            log.warning("job %s: its ack was lost (%s); running it all the same", job.job_id, exc)
        return Attempt(entry, self._identity, plan=plan)

    async def _run(self, attempt: Attempt) -> None:
        """obtain → supervise → finish → clean up, for a job in hand."""
        self._in_hand[attempt.job_id] = attempt
        self.started += 1
        try:
            attempt.stop_request = self._cancelled_by_user(attempt.job_id)
            outcome: Outcome | None
            try:
                outcome = await self._outcome(attempt)
            except RetryLater as wait:
                outcome = await self._park(attempt, wait)
            if outcome is not None:  # None: parked, the broker holds the job again
                await self._finish(attempt, outcome)
                await self._clean_up(attempt)
        finally:
            self.finished += 1
            if self._in_hand.get(attempt.job_id) is attempt:
                del self._in_hand[attempt.job_id]

    async def _outcome(self, attempt: Attempt) -> Outcome:
        try:
            sandbox = await self._obtain(attempt)
            if isinstance(sandbox, Outcome):
                return sandbox
            if attempt.adopted and self._supervisor.must_stop_on_takeover(sandbox):
                return await self._supervisor.stop_on_takeover(attempt, sandbox)
            return await self._supervisor.supervise(attempt, sandbox)
        except RetryLater:
            raise
        except RequestInvalid as exc:  # a job taken over, checked again on a changed host
            return Outcome.failed("InvalidDriverConfig", str(exc))
        except SandboxError as exc:
            return Outcome.failed(exc.reason, str(exc))
        except Exception as exc:
            log.exception("job %s: unexpected error", attempt.job_id)
            return Outcome.failed("WorkerError", f"{type(exc).__name__}: {exc}")

    async def _obtain(self, attempt: Attempt) -> SandboxState | Outcome:
        """The job's one sandbox; never a second one."""
        found = await self._driver.find(attempt.sandbox_name)
        if found is not None:
            return await self._adopt(attempt, found)
        if attempt.sandbox_id is not None:
            message = f"sandbox {attempt.sandbox_id} disappeared while no worker watched it"
            return Outcome.failed("SandboxLost", message)
        if attempt.stop_request is not None:
            return attempt.stop_request.before_start()
        if refusal := self._policy.timeout_refusal(attempt.job.template.timeout_seconds):
            return Outcome.failed("TimeoutTooLong", refusal)  # before any GPU or sandbox
        plan = attempt.plan or self._check.plan(attempt.job)
        if (warm := await self._take_warm(attempt, plan)) is not None:
            return warm
        claim = await self._claiming.claim(attempt, plan.gpus)
        return await self._create(attempt, plan, claim)

    async def _adopt(self, attempt: Attempt, sandbox: SandboxState) -> SandboxState:
        log.info("job %s: adopting sandbox %s", attempt.job_id, sandbox.sandbox_id)
        await self._record_sandbox(attempt, sandbox)  # first: whatever fails next, it is removed
        claim = await self._gpus.adopt(attempt.job_id)
        attempt.devices = claim.devices if claim is not None else ()
        attempt.adopted = True
        return sandbox

    async def _take_warm(self, attempt: Attempt, plan: JobPlan) -> SandboxState | None:
        """A ready sandbox of the pool matching the job, given the job; None: it starts
        cold (no pool matches, or none is ready). Recorded at once, as a created one."""
        try:
            taken = await self._warm.take(attempt.job, plan.config, self._spec(attempt, plan, None))
        except SandboxNameTaken:
            return await self._adopt(attempt, await self._created_late(attempt))
        if taken is None:
            return None
        pool, sandbox = taken
        # Its journal entry holds when it started: the runtime started it for its pool
        # and cannot say when the job began in it; a successor's timeout counts from here.
        attempt.taken_warm(pool)
        await self._record_sandbox(attempt, sandbox)
        return sandbox

    async def _created_late(self, attempt: Attempt) -> SandboxState:
        """A dead worker's create of this job landed after we looked: that sandbox is the
        job's one sandbox (and its GPUs, any this job claimed)."""
        late = await self._driver.find(attempt.sandbox_name)
        if late is None:
            raise SandboxError(f"{attempt.sandbox_name} was taken, and then gone")
        log.info("job %s: adopting %s, created late", attempt.job_id, late.sandbox_id)
        return late

    async def _create(
        self, attempt: Attempt, plan: JobPlan, claim: Claim | None
    ) -> SandboxState | Outcome:
        attempt.mark(CREATING)
        self._warm.served_cold += 1
        await self._emit(attempt, Phase.STARTING, "Creating", f"creating {attempt.sandbox_name}")
        try:
            spec = self._spec(attempt, plan, claim)
            created = await attempt.create_unless_stopped(lambda: self._driver.create(spec))
        except SandboxNameTaken:
            created = await self._created_late(attempt)
        except Exception:
            await self._record_left_behind(attempt)
            raise
        if isinstance(created, StopRequest):
            await self._record_left_behind(attempt)  # a create that landed as it was cut short
            return created.before_start()
        attempt.mark(CREATED)
        # Recorded before anything else can fail: clean-up removes a recorded sandbox
        # before its GPUs go, and any failure from here on ends in clean-up.
        await self._record_sandbox(attempt, created)
        if claim is not None:
            await self._gpus.attach(attempt.job_id, created.sandbox_id)
        return created

    def _ship_output(self, attempt: Attempt) -> None:
        assert attempt.sandbox_id is not None
        self._logs.begin(attempt.job_id, self._driver.follow_output(attempt.sandbox_id))

    async def _finish(self, attempt: Attempt, outcome: Outcome) -> None:
        """Record the terminal event, then publish it: a successor re-publishes a recorded one.
        The log's end goes first, so a reader that saw the terminal event has all of it."""
        await self._logs.end(attempt.job_id)
        event = attempt.terminal_event(outcome)
        await self._journal_write(attempt, terminal=event)
        await self._events.publish(event)

    async def _clean_up(self, attempt: Attempt) -> None:
        """The sandbox goes first, then its GPUs: a GPU is never free while a sandbox has it."""
        if attempt.sandbox_id is not None:
            try:
                await self._driver.remove(attempt.sandbox_id)
            except Exception:  # of any kind: the sandbox may run on, so nothing is let go
                log.exception(
                    "job %s: removing sandbox %s failed; its GPUs stay claimed and its "
                    "journal entry open until a worker of this host takes it over",
                    attempt.job_id, attempt.sandbox_id,
                )  # fmt: skip
                return
        await self._gpus.release(attempt.job_id)
        await self._journal_write(attempt, closed=True)

    async def _park(self, attempt: Attempt, wait: RetryLater) -> Outcome | None:
        """Back to the broker until its GPUs may be free, holding no slot and no GPU.

        The entry is marked parked before the copy is published: a copy that comes back
        at once takes it. An outcome if the job could not be parked and is ours still."""
        job_id, me = attempt.job_id, self._identity.worker_id
        await self._journal_write(attempt, parked=True)
        try:
            await self._queues.park(attempt.job, delay=wait.delay, waiting_since=wait.waiting_since)
        except Exception as exc:
            log.exception("job %s: could not park it while its GPUs are busy", job_id)
            if (entry := await asyncio.to_thread(self._journal.unpark, job_id, me)) is None:
                return None  # its copy was parked after all, and has taken it since
            attempt.entry = entry
            return Outcome.failed("WorkerError", f"could not park it for its GPUs: {exc}")
        await asyncio.to_thread(self._journal.drop_parked, job_id, me)
        return None

    # ---- helpers ----

    def _cancelled_by_user(self, job_id: str) -> StopRequest | None:
        request = self._cancellations.get(job_id)
        return None if request is None else StopRequest.cancelled(request.reason)

    @contextmanager
    def _working_on(self, job_id: str) -> Iterator[None]:
        self._working[job_id] += 1
        try:
            yield
        finally:
            self._working[job_id] -= 1
            if not self._working[job_id]:
                del self._working[job_id]

    async def _record_left_behind(self, attempt: Attempt) -> None:
        """After a failed create: a sandbox the runtime made all the same is the job's,
        so that clean-up removes it before the GPUs go."""
        try:
            left = await self._driver.find(attempt.sandbox_name)
            if left is not None:
                await self._record_sandbox(attempt, left)
        except Exception:
            log.exception("job %s: looking for a sandbox left by a failed create", attempt.job_id)

    def _spec(self, attempt: Attempt, plan: JobPlan, claim: Claim | None) -> SandboxSpec[Any]:
        gpus = () if claim is None else tuple(map(ClaimedGpu, claim.gpus, claim.devices))
        return SandboxSpec.for_job(
            attempt.job,
            plan.config,
            driver=self._driver.name,
            worker_id=self._identity.worker_id,
            gpus=gpus,
        )

    async def _record_sandbox(self, attempt: Attempt, sandbox: SandboxState) -> None:
        attempt.sandbox_id = sandbox.sandbox_id
        await self._journal_write(attempt, sandbox_id=sandbox.sandbox_id)

    async def _journal_write(self, attempt: Attempt, **changes: Any) -> None:
        attempt.entry = attempt.entry.model_copy(update=changes)
        await asyncio.to_thread(self._journal.write, attempt.entry)

    async def _emit(self, attempt: Attempt, phase: Phase, reason: str, message: str = "") -> None:
        await self._events.publish(attempt.event(phase, reason, message))
