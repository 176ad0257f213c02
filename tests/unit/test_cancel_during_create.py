"""A cancellation that arrives while a job's sandbox is being created (a Docker or
Podman image pull may take minutes) cuts the create short: the job ends `cancelled`
at once, and whatever the create left is removed before the job's GPUs are freed.
A worker shutting down is no cancellation: the job is left to the next worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
from sandfleet_inmemory import InMemoryBlock

from sandfleet.common.errors import ImageUnavailable
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import CancelRequest
from sandfleet.workers.drivers.base import SandboxSpec, SandboxState
from tests.support.fakes import Harness, harness, job
from tests.support.gpus import FOUR_UUIDS

T = TypeVar("T")

CLAIMED_FIRST_GPU = {"a": (FOUR_UUIDS[0],)}


async def within(step: Awaitable[T], seconds: float = 5) -> T:
    async with asyncio.timeout(seconds):
        return await step


class EndlessCreate:
    """A create hook that never returns, as a pull from a registry that never answers;
    it notes how it ended."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.cancelled = False

    async def __call__(self, name: str) -> None:
        self.reached.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def run_until_it_hangs(h: Harness, hook: EndlessCreate) -> asyncio.Task[None]:
    """Job "a", with one GPU, run until its create hangs in `hook`."""
    task = asyncio.create_task(h.runner.handle(h.delivery(job("a", gpus=1))))
    await within(hook.reached.wait())
    return task


async def cancel_a(h: Harness) -> None:
    await h.runner.cancel(CancelRequest(job_id="a", reason="stop it"))


def ended(h: Harness) -> tuple[Phase, str, str]:
    last = h.events.last("a")
    return last.phase, last.reason, last.message


def closed(h: Harness) -> bool:
    entry = h.journal.read("a")
    return entry is not None and entry.closed


async def test_a_create_that_never_ends_is_cut_short_by_a_cancel(tmp_path: Path) -> None:
    h, hook = harness(tmp_path), EndlessCreate()
    h.driver.hooks["create"] = hook
    task = await run_until_it_hangs(h, hook)
    await cancel_a(h)
    await within(task)
    assert ended(h) == (Phase.CANCELLED, "CancelledBeforeStart", "stop it")
    assert hook.cancelled
    assert h.gpus_held() == {}
    assert closed(h)
    assert h.driver.sandboxes == {}
    assert "start" not in [op for op, _ in h.calls]


async def test_a_create_that_fails_as_it_is_cut_short_ends_cancelled(tmp_path: Path) -> None:
    # A driver may report its interrupted pull as an error rather than a cancellation.
    h, hook = harness(tmp_path), EndlessCreate()

    async def pull_interrupted(name: str) -> None:
        try:
            await hook(name)
        except asyncio.CancelledError:
            raise ImageUnavailable("pulling none: the connection was closed") from None

    h.driver.hooks["create"] = pull_interrupted
    task = await run_until_it_hangs(h, hook)
    await cancel_a(h)
    await within(task)
    assert ended(h) == (Phase.CANCELLED, "CancelledBeforeStart", "stop it")
    assert h.gpus_held() == {}
    assert closed(h)


async def test_a_create_that_lands_as_it_is_cut_short_is_removed_before_its_gpus_go(
    tmp_path: Path,
) -> None:
    h, hook = harness(tmp_path), EndlessCreate()
    create = h.driver.create
    at_remove: list[tuple[dict[str, tuple[str, ...]], bool]] = []

    async def made_then_hangs(spec: SandboxSpec[InMemoryBlock]) -> SandboxState:
        made = await create(spec)  # the container exists; inspecting it hangs
        await hook(spec.name)
        return made

    async def note_claims_and_entry(sandbox_id: str) -> None:
        at_remove.append((h.gpus_held(), closed(h)))

    h.driver.create = made_then_hangs  # type: ignore[method-assign]
    h.driver.hooks["remove"] = note_claims_and_entry
    task = await run_until_it_hangs(h, hook)
    await cancel_a(h)
    await within(task)
    assert ended(h) == (Phase.CANCELLED, "CancelledBeforeStart", "stop it")
    assert at_remove == [(CLAIMED_FIRST_GPU, False)]  # GPUs held, entry open while removed
    assert h.driver.sandboxes == {}
    assert h.gpus_held() == {}
    assert closed(h)


async def test_a_cancel_as_the_create_is_announced_makes_no_sandbox(tmp_path: Path) -> None:
    h = harness(tmp_path)
    publish = h.events.publish

    async def cancelled_while_announced(event: Event) -> None:
        await publish(event)
        if event.phase is Phase.STARTING:
            await cancel_a(h)

    h.events.publish = cancelled_while_announced  # type: ignore[method-assign]
    await within(h.runner.handle(h.delivery(job("a", gpus=1))))
    assert ended(h) == (Phase.CANCELLED, "CancelledBeforeStart", "stop it")
    assert "create" not in [op for op, _ in h.calls]
    assert h.gpus_held() == {}


async def test_a_shutdown_during_a_create_leaves_the_job_to_the_next_worker(
    tmp_path: Path,
) -> None:
    h, hook = harness(tmp_path), EndlessCreate()
    h.driver.hooks["create"] = hook
    task = await run_until_it_hangs(h, hook)
    task.cancel()  # as a worker's drain does to the jobs it still has in the end
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert hook.cancelled  # the create runs on no longer than its worker
    assert h.events.phases("a") == [Phase.CLAIMED, Phase.STARTING]  # no terminal event
    assert h.journal.open_job_ids() == {"a"}
    assert h.gpus_held() == CLAIMED_FIRST_GPU  # kept for whoever takes it over


async def test_a_shutdown_right_after_a_cancel_is_not_swallowed_by_it(tmp_path: Path) -> None:
    h, hook = harness(tmp_path), EndlessCreate()
    h.driver.hooks["create"] = hook
    task = await run_until_it_hangs(h, hook)
    h.cancellations.add("a", "stop it")
    await cancel_a(h)
    task.cancel()  # before the cancelled create has unwound
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert h.journal.open_job_ids() == {"a"}
    # The next worker finds the cancellation in the log, and ends the job.
    entry = h.journal.read("a")
    assert entry is not None
    await within(h.runner.take_over(entry))
    assert ended(h) == (Phase.CANCELLED, "CancelledBeforeStart", "stop it")
    assert h.gpus_held() == {}
    assert closed(h)
