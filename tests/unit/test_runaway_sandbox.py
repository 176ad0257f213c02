"""No runaway sandbox: whatever fails once a job's sandbox exists (any exception, any
step), the sandbox is removed before its GPUs are let go and before its journal entry
closes; one that cannot be removed keeps both until a later take-over removes it. A
timeout too long to count is refused before anything is claimed or made."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.models import CancelRequest
from sandfleet.workers import supervision
from sandfleet.workers.attempt import RunPolicy
from sandfleet.workers.drivers.base import SandboxSpec, sandbox_name
from tests.support.fakes import WORKER, Harness, harness, job
from tests.support.gpus import FOUR_UUIDS

T = TypeVar("T")

HUGE = 10**400  # past a float: `timeout - elapsed` overflows
GPU = FOUR_UUIDS[0]


async def within(step: Awaitable[T], seconds: float = 5) -> T:
    async with asyncio.timeout(seconds):
        return await step


def raising(error: Exception) -> Callable[..., Awaitable[None]]:
    async def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


def raising_now(error: Exception) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


def claims_seen_at_removal(h: Harness) -> list[dict[str, tuple[str, ...]]]:
    """The GPU claims as they stood at each `remove` of a sandbox."""
    seen: list[dict[str, tuple[str, ...]]] = []

    async def note(sandbox_id: str) -> None:
        seen.append(h.gpus_held())

    h.driver.hooks["remove"] = note
    return seen


def closed(h: Harness, job_id: str) -> bool:
    entry = h.journal.read(job_id)
    return entry is not None and entry.closed


# ---- a failure at each step after create ----

Inject = Callable[[Harness, pytest.MonkeyPatch], None]


def driver_step_fails(operation: str) -> Inject:
    def inject(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        h.driver.hooks[operation] = raising(RuntimeError(f"{operation} broke"))

    return inject


def claim_attach_fails(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h.claims, "attach_sandbox", raising_now(OSError("no space left")))


def timeout_arithmetic_fails(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    error = OverflowError("int too large to convert to float")
    monkeypatch.setattr(supervision, "_deadline", raising_now(error))


def started_event_fails(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    publish = h.events.publish

    async def lost_if_running(event: Event) -> None:
        if event.phase is Phase.RUNNING:
            raise KeyError("a bug in publishing")
        await publish(event)

    monkeypatch.setattr(h.events, "publish", lost_if_running)


STEPS: dict[str, tuple[Inject, float]] = {  # what fails, and how long the sandbox runs
    "attach its GPUs": (claim_attach_fails, 60),
    "start": (driver_step_fails("start"), 60),
    "say it started": (started_event_fails, 60),
    "timeout arithmetic": (timeout_arithmetic_fails, 60),
    "wait": (driver_step_fails("wait"), 60),
    "stop at its timeout": (driver_step_fails("stop"), 60),
    "output": (driver_step_fails("output"), 0),
}


@pytest.mark.parametrize("step", list(STEPS))
async def test_any_failure_after_create_removes_the_sandbox_before_its_gpus_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    h = harness(tmp_path)
    inject, run_seconds = STEPS[step]
    inject(h, monkeypatch)
    at_removal = claims_seen_at_removal(h)
    await within(h.runner.handle(h.delivery(job("a", gpus=1, timeout=1, run_seconds=run_seconds))))
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.FAILED, "WorkerError")
    assert h.driver.sandboxes == {}  # not left running with the GPU inside
    assert at_removal == [{"a": (GPU,)}]  # removed while its GPU was still claimed
    assert h.gpus_held() == {}
    assert closed(h, "a")


async def test_a_failure_adopting_the_claim_of_a_late_created_sandbox_still_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead worker's create landed after it died: its entry names no sandbox."""
    h = harness(tmp_path)
    taken = job("a", gpus=1, run_seconds=60)
    h.alive.add("dead")
    h.journal.take(taken, "dead")
    h.claims.claim(job_id="a", gpus=[GPU], devices=["d0"], driver="inmemory", worker_id="dead")
    h.alive.discard("dead")
    spec = SandboxSpec.for_job(
        taken, h.driver.parse_config(taken), driver="inmemory", worker_id="dead"
    )
    await h.driver.start((await h.driver.create(spec)).sandbox_id)
    monkeypatch.setattr(h.claims, "adopt", raising_now(OSError("no space left")))
    at_removal = claims_seen_at_removal(h)
    for entry in h.journal.take_over_dead(WORKER):
        await within(h.runner.take_over(entry))
    assert (h.events.last("a").phase, h.events.last("a").reason) == (Phase.FAILED, "WorkerError")
    assert h.driver.sandboxes == {}
    assert at_removal == [{"a": (GPU,)}]
    assert h.gpus_held() == {} and closed(h, "a")


# ---- a sandbox that cannot be removed ----


async def test_a_removal_failing_in_any_way_keeps_the_gpus_and_the_entry_until_a_take_over(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    h.driver.hooks["remove"] = raising(ConnectionResetError("runtime socket closed"))
    await within(h.runner.handle(h.delivery(job("a", gpus=1))))
    [entry] = h.journal.open_entries(WORKER)
    assert entry.terminal is not None and entry.terminal.phase is Phase.SUCCEEDED
    assert sandbox_name("a") in h.driver.sandboxes
    assert h.gpus_held() == {"a": (GPU,)}
    # The reconciler's take-over of this worker's own unfinished entry tries again.
    del h.driver.hooks["remove"]
    await within(h.runner.take_over(entry))
    assert h.driver.sandboxes == {} and h.gpus_held() == {} and closed(h, "a")
    assert h.events.last("a").event_id == entry.terminal.event_id  # said again, same id


async def test_a_stop_failing_in_any_way_does_not_break_the_cancellation(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    waiting = asyncio.Event()

    async def reached(sandbox_id: str) -> None:
        waiting.set()

    h.driver.hooks["wait"] = reached
    h.driver.hooks["stop"] = raising(RuntimeError("stop broke"))
    task = asyncio.create_task(h.runner.handle(h.delivery(job("a", run_seconds=0.2))))
    await within(waiting.wait())
    await within(h.runner.cancel(CancelRequest(job_id="a", reason="stop it")))  # no raise
    await within(task)
    assert h.events.last("a").phase is Phase.CANCELLED  # ended on its own, as asked
    assert h.driver.sandboxes == {} and closed(h, "a")


# ---- timeouts too long to count ----


async def test_a_timeout_past_the_maximum_fails_before_any_gpu_or_sandbox(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await within(h.runner.handle(h.delivery(job("a", gpus=1, timeout=HUGE))))
    [event] = h.events.of("a")
    assert (event.phase, event.reason) == (Phase.FAILED, "TimeoutTooLong")
    assert event.message == (
        "template.timeout_seconds: a number of more than 18 digits is more than this "
        "worker's maximum, 604800 (SANDFLEET_MAX_TIMEOUT_SECONDS)"
    )
    assert "create" not in [op for op, _ in h.calls]
    assert h.gpus_held() == {} and closed(h, "a")


async def test_a_timeout_at_the_maximum_is_accepted(tmp_path: Path) -> None:
    h = harness(tmp_path, policy=RunPolicy(max_timeout_seconds=3600))
    await within(h.runner.handle(h.delivery(job("a", timeout=3600))))
    assert h.events.last("a").phase is Phase.SUCCEEDED


async def test_an_adopted_sandbox_with_a_timeout_past_the_maximum_is_held_to_it(
    tmp_path: Path,
) -> None:
    """Its job was journaled before this worker's maximum was what it is now."""
    h = harness(tmp_path, policy=RunPolicy(stop_grace_seconds=0, max_timeout_seconds=0.1))
    taken = job("a", timeout=HUGE, run_seconds=60)
    h.alive.add("dead")
    entry = h.journal.take(taken, "dead")
    h.alive.discard("dead")
    spec = SandboxSpec.for_job(
        taken, h.driver.parse_config(taken), driver="inmemory", worker_id="dead"
    )
    made = await h.driver.create(spec)
    await h.driver.start(made.sandbox_id)
    h.journal.write(entry.model_copy(update={"sandbox_id": made.sandbox_id}))
    for mine in h.journal.take_over_dead(WORKER):
        await within(h.runner.take_over(mine))
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.TIMED_OUT, "Timeout")
    assert last.message == (
        "exceeded this worker's maximum run time, 0.1s (SANDFLEET_MAX_TIMEOUT_SECONDS)"
    )
    assert h.driver.sandboxes == {} and closed(h, "a")


def test_a_timeout_refusal_names_the_field_and_the_value() -> None:
    policy = RunPolicy(max_timeout_seconds=60)
    assert policy.timeout_refusal(None) is None
    assert policy.timeout_refusal(60) is None
    assert policy.timeout_refusal(61) == (
        "template.timeout_seconds: 61 is more than this worker's maximum, 60 "
        "(SANDFLEET_MAX_TIMEOUT_SECONDS)"
    )
    assert policy.bounded_timeout(HUGE) == 60
