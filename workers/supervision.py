"""Supervising a job's sandbox: start it, wait for it within the job's timeout, and end
it early when asked (a cancellation, a shutdown, a take-over by policy); what it ended
with becomes the job's `Outcome`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sandfleet.common.errors import SandboxError
from sandfleet.common.events import Phase
from sandfleet.common.settings import SandboxPolicy
from sandfleet.workers.attempt import Attempt, Outcome, RunPolicy, StopRequest
from sandfleet.workers.drivers.base import SandboxDriver, SandboxState, SandboxStatus
from sandfleet.workers.stage_timings import STARTED

Emit = Callable[[Attempt, Phase, str, str], Awaitable[None]]
Started = Callable[[Attempt], None]


class SandboxSupervisor:
    """`emit(attempt, phase, reason, message)` publishes one of the job's events;
    `started(attempt)` is told of each sandbox it started (to ship its output)."""

    def __init__(
        self, driver: SandboxDriver[Any], emit: Emit, policy: RunPolicy, started: Started
    ) -> None:
        self._driver = driver
        self._emit = emit
        self._policy = policy
        self._on_started = started

    async def supervise(self, attempt: Attempt, sandbox: SandboxState) -> Outcome:
        """Run the sandbox to its end, within the job's timeout, unless asked to stop."""
        # A warm sandbox's job started when it was taken, however soon it ended: it is
        # announced `running` and its output shipped like any started sandbox's.
        if sandbox.status is SandboxStatus.EXITED and attempt.warm_pool is None:
            return await self._ended(attempt, sandbox.exit_code)
        if attempt.stop_request is not None:  # asked before it started
            return await self._stop_early(attempt, attempt.stop_request)
        started_at = await self._started(attempt, sandbox)
        if attempt.stop_request is not None:  # asked while it started
            return await self._stop_early(attempt, attempt.stop_request)
        timeout = self._policy.bounded_timeout(attempt.job.template.timeout_seconds)
        try:
            async with asyncio.timeout_at(_deadline(started_at, timeout)):
                exit_code = await self._driver.wait(sandbox.sandbox_id)
        except TimeoutError:
            request = StopRequest(Phase.TIMED_OUT, "Timeout", self._timed_out(attempt))
            return await self._stop_early(attempt, request)
        except SandboxError:
            if attempt.stop_request is None:
                raise
            exit_code = None  # stopped on request: a runtime may not say more of how it ended
        return await self._ended(attempt, exit_code)

    async def _started(self, attempt: Attempt, sandbox: SandboxState) -> datetime:
        """Start a new sandbox (or take an adopted one as it runs); when it started."""
        if attempt.warm_pool is not None:  # taken from a pool: the job's command runs
            started_at = attempt.entry.stage_marks[STARTED]
            self._on_started(attempt)
            await self._emit(attempt, Phase.RUNNING, "Started", f"warm (pool {attempt.warm_pool})")
            return started_at
        if sandbox.status is SandboxStatus.CREATED:
            await self._driver.start(sandbox.sandbox_id)
            started_at = datetime.now(UTC)
            attempt.mark(STARTED, started_at)
            self._on_started(attempt)
            await self._emit(attempt, Phase.RUNNING, "Started", "")
            return started_at
        # An adopted sandbox's output is not shipped again: its first worker shipped it
        # as far as it got, and shipping it from the start would repeat that.
        await self._emit(attempt, Phase.RUNNING, "Adopted", "found running after a redelivery")
        # Its first worker's mark, if it was written (a warm sandbox's runtime start was
        # its pool's, not its job's), else the runtime's.
        marked = attempt.entry.stage_marks.get(STARTED)
        started_at = marked or sandbox.started_at or datetime.now(UTC)
        attempt.mark(STARTED, started_at)
        return started_at

    def _timed_out(self, attempt: Attempt) -> str:
        asked = attempt.job.template.timeout_seconds
        if asked is not None and self._policy.timeout_refusal(asked) is None:
            return f"exceeded timeout_seconds={asked}"
        limit = self._policy.max_timeout_seconds
        return (
            f"exceeded this worker's maximum run time, {limit:g}s (SANDFLEET_MAX_TIMEOUT_SECONDS)"
        )

    def must_stop_on_takeover(self, sandbox: SandboxState) -> bool:
        running = sandbox.status is not SandboxStatus.EXITED
        return running and self._policy.takeover is SandboxPolicy.STOP

    async def stop_on_takeover(self, attempt: Attempt, sandbox: SandboxState) -> Outcome:
        message = (
            f"found {sandbox.status.value} after its worker was gone; "
            "SANDFLEET_TAKEOVER_POLICY=stop stops such sandboxes"
        )
        request = StopRequest(Phase.CANCELLED, "StoppedOnTakeover", message)
        return await self._stop_early(attempt, request)

    async def _stop_early(self, attempt: Attempt, request: StopRequest) -> Outcome:
        assert attempt.sandbox_id is not None
        await self.stop_sandbox(attempt.sandbox_id)
        output = await self._output(attempt.sandbox_id)
        return request.outcome(output)

    async def _ended(self, attempt: Attempt, exit_code: int | None) -> Outcome:
        assert attempt.sandbox_id is not None
        output = await self._output(attempt.sandbox_id)
        stop = attempt.stop_request  # stopped while it ran: that is why it ended
        if stop is not None:
            return stop.outcome(output)
        if exit_code is None:
            message = "the sandbox ended without reporting an exit code"
            return Outcome.failed("NoExitCode", message, output=output)
        if exit_code == 0:
            return Outcome(phase=Phase.SUCCEEDED, reason="Completed", exit_code=0, output=output)
        message = f"exited with code {exit_code}"
        return Outcome.failed("NonZeroExit", message, exit_code=exit_code, output=output)

    async def stop_sandbox(self, sandbox_id: str) -> None:
        await self._driver.stop(sandbox_id, grace_seconds=self._policy.stop_grace_seconds)

    async def _output(self, sandbox_id: str) -> str:
        return await self._driver.output(sandbox_id, lines=self._policy.output_tail_lines)


def _deadline(started_at: datetime, timeout_seconds: float | None) -> float | None:
    """The loop-clock time at which a sandbox started at `started_at` runs out of time."""
    if timeout_seconds is None:
        return None
    elapsed = (datetime.now(UTC) - started_at).total_seconds()
    return asyncio.get_running_loop().time() + max(0.0, timeout_seconds - elapsed)
