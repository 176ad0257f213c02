"""The job runner's steps, each outcome, and each way a job ends early, against the
in-memory driver (no broker, no runtime)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sandfleet_inmemory import InMemoryBlock

from sandfleet.common.errors import (
    DeadLetter,
    ImageUnavailable,
    RequestInvalid,
    SandboxError,
    SandboxNameTaken,
)
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import CancelRequest, Job
from sandfleet.common.settings import SandboxPolicy
from sandfleet.workers.attempt import RunPolicy, StopRequest
from sandfleet.workers.drivers.base import LABEL_JOB_ID, SandboxSpec, SandboxState, sandbox_name
from sandfleet.workers.identity import WorkerIdentity
from tests.support.fakes import WORKER, Delivery, Harness, harness, job
from tests.support.gpus import FOUR_UUIDS

T = TypeVar("T")

S, R = Phase.STARTING, Phase.RUNNING


async def within(step: Awaitable[T], seconds: float = 5) -> T:
    async with asyncio.timeout(seconds):
        return await step


class Pause:
    """A driver hook that holds the runner at one step until released."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, subject: str) -> None:
        self.reached.set()
        await self.release.wait()


async def held_at(
    h: Harness,
    operation: str,
    during: Callable[[], Awaitable[object]],
    *,
    fail_after: Exception | None = None,
    **job_fields: Any,
) -> None:
    """Run job "a" up to the driver's `operation`, do `during` there, then let it go on
    (the operation failing with `fail_after`, if given) to its end."""
    pause = Pause()

    async def hold(subject: str) -> None:
        await pause(subject)
        if fail_after is not None:
            raise fail_after

    h.driver.hooks[operation] = hold
    task = asyncio.create_task(h.runner.handle(h.delivery(job("a", **job_fields))))
    await within(pause.reached.wait())
    await during()
    pause.release.set()
    await within(task)


def cancel_a(h: Harness) -> Callable[[], Awaitable[None]]:
    return lambda: h.runner.cancel(CancelRequest(job_id="a", reason="stop it"))


def fail_with(error: Exception) -> Pause:
    async def hook(subject: str) -> None:
        raise error

    return hook  # type: ignore[return-value]


async def run(h: Harness, job_id: str, **job_fields: object) -> None:
    await within(h.runner.handle(h.delivery(job(job_id, **job_fields))))  # type: ignore[arg-type]


def closed(h: Harness, job_id: str) -> bool:
    entry = h.journal.read(job_id)
    return entry is not None and entry.closed


async def test_a_job_runs_acked_before_its_sandbox_is_made_and_is_cleaned_up(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    await run(h, "a", output="hello\n")
    assert h.events.phases("a") == [S, R, Phase.SUCCEEDED]
    assert h.events.last("a").output == "hello\n"
    assert h.events.last("a").exit_code == 0
    operations = [op for op, _ in h.calls]
    assert operations.index("ack") < operations.index("create") < operations.index("start")
    assert operations[-1] == "remove"
    assert h.driver.sandboxes == {}
    assert closed(h, "a")
    entry = h.journal.read("a")
    assert entry is not None and entry.terminal is not None
    assert entry.terminal.event_id == h.events.last("a").event_id  # recorded, then published


async def test_the_sandbox_carries_the_jobs_labels_and_sandfleets(tmp_path: Path) -> None:
    h = harness(tmp_path)
    made: list[dict[str, str]] = []

    async def keep_labels(name: str) -> None:
        made.append(dict(h.driver.sandboxes[name].labels))

    h.driver.hooks["start"] = lambda sandbox_id: keep_labels(sandbox_name("a"))
    await run(h, "a")
    assert made[0][LABEL_JOB_ID] == "a"
    assert made[0]["sandfleet.worker_id"] == WORKER
    assert made[0]["sandfleet.driver"] == "inmemory"


async def test_a_nonzero_exit_fails_with_its_code(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await run(h, "a", exit_code=3)
    last = h.events.last("a")
    assert (last.phase, last.reason, last.exit_code) == (Phase.FAILED, "NonZeroExit", 3)


async def test_a_job_from_the_shared_queue_is_bound_to_the_host_not_run(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await within(h.runner.handle(h.delivery(job("a"), shared=True)))
    assert [j.job_id for j in h.queues.bound] == ["a"]
    assert h.calls == []  # no sandbox looked for, no ack (settle acks the shared copy)
    assert h.journal.read("a") is None


async def test_a_second_delivery_of_a_job_in_hand_is_dropped(tmp_path: Path) -> None:
    h = harness(tmp_path)
    pause = Pause()
    h.driver.hooks["wait"] = pause
    first = asyncio.create_task(h.runner.handle(h.delivery(job("a"))))
    await within(pause.reached.wait())
    second = h.delivery(job("a"))
    await within(h.runner.handle(second))
    assert not second.processed  # not acked by the runner: settle acks the duplicate
    pause.release.set()
    await within(first)
    assert [op for op, _ in h.calls].count("create") == 1


async def test_a_finished_jobs_late_duplicate_is_dropped(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await run(h, "a")
    await run(h, "a")
    assert [op for op, _ in h.calls].count("create") == 1
    assert h.events.phases("a") == [S, R, Phase.SUCCEEDED]


async def test_an_invalid_block_is_rejected_with_its_path_and_dead_lettered(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    with pytest.raises(RequestInvalid):
        await run(h, "a", colour="red")
    [event] = h.events.of("a")
    assert (event.phase, event.reason) == (Phase.REJECTED, "InvalidDriverConfig")
    assert [e.field for e in event.errors] == ["template.driver_config.inmemory.colour"]
    assert h.calls == []


async def test_a_gpu_the_host_lacks_is_rejected_naming_the_id(tmp_path: Path) -> None:
    h = harness(tmp_path)
    with pytest.raises(RequestInvalid):
        await run(h, "a", gpus=1, gpu_ids=["GPU-nope"])
    [event] = h.events.of("a")
    assert [e.field for e in event.errors] == ["template.driver_config.inmemory.gpu_device_ids.0"]


async def test_a_block_that_crashes_its_parser_is_dead_lettered(tmp_path: Path) -> None:
    h = harness(tmp_path)

    def crash(_: object) -> InMemoryBlock:
        raise ZeroDivisionError("boom")

    h.driver.parse_config = crash  # type: ignore[method-assign,assignment]
    with pytest.raises(DeadLetter):
        await run(h, "a")
    [event] = h.events.of("a")
    assert (event.phase, event.reason) == (Phase.REJECTED, "DriverConfigCrashed")
    assert "ZeroDivisionError: boom" in event.message


async def test_a_message_that_is_no_job_is_rejected(tmp_path: Path) -> None:
    h = harness(tmp_path)
    delivery = h.delivery(job("a"))
    delivery.body = b'{"job_id": "a"}'
    with pytest.raises(RequestInvalid):
        await within(h.runner.handle(delivery))
    assert h.events.of("a") == []  # not a job: its claimed id is not spoken for
    [event] = h.events.of(None)
    assert (event.phase, event.reason) == (Phase.REJECTED, "MalformedJob")
    assert "claims id 'a'" in event.message


async def test_a_job_cancelled_before_it_arrives_never_starts(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.cancellations.add("a", "changed my mind")
    await run(h, "a")
    last = h.events.last("a")
    assert (last.phase, last.reason, last.message) == (
        Phase.CANCELLED,
        "CancelledBeforeStart",
        "changed my mind",
    )
    assert "create" not in [op for op, _ in h.calls]
    assert closed(h, "a")


async def test_a_job_cancelled_while_its_sandbox_is_created_is_never_started(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    await held_at(h, "create", cancel_a(h))
    last = h.events.last("a")
    assert (last.phase, last.reason, last.message) == (
        Phase.CANCELLED,
        "CancelledBeforeStart",  # its create was cut short (test_cancel_during_create.py)
        "stop it",
    )
    assert "start" not in [op for op, _ in h.calls]
    assert h.driver.sandboxes == {}


async def test_a_job_cancelled_while_it_starts_is_stopped_once_started(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await held_at(h, "start", cancel_a(h), run_seconds=60)
    assert h.events.last("a").phase is Phase.CANCELLED
    operations = [op for op, _ in h.calls]
    assert operations.index("start") < len(operations) - 1 - operations[::-1].index("stop")


async def test_a_running_job_cancelled_is_stopped_with_its_output(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await held_at(h, "wait", cancel_a(h), run_seconds=60)
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.CANCELLED, "Cancelled")
    assert last.output == "echo a\n"
    assert ("stop", sandbox_name("a")) in h.calls


async def test_a_job_stopped_on_request_is_cancelled_even_if_its_wait_then_fails(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    no_code = SandboxError("the guest stopped without reporting an exit code")
    await held_at(h, "wait", cancel_a(h), fail_after=no_code, run_seconds=60)
    assert (h.events.last("a").phase, h.events.last("a").reason) == (Phase.CANCELLED, "Cancelled")


async def test_a_cancellation_of_a_job_not_in_hand_does_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await h.runner.cancel(CancelRequest(job_id="elsewhere"))
    assert h.calls == [] and h.events.events == []


async def test_a_job_over_its_timeout_is_stopped_and_timed_out(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await run(h, "a", timeout=1, run_seconds=60)
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.TIMED_OUT, "Timeout")
    assert last.message == "exceeded timeout_seconds=1"
    assert h.driver.sandboxes == {}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ImageUnavailable("no such image"), "ImageUnavailable"),
        (SandboxError("full"), "SandboxFailed"),
    ],
)
async def test_a_failed_create_fails_the_job_and_frees_its_gpus(
    tmp_path: Path, error: SandboxError, reason: str
) -> None:
    h = harness(tmp_path)
    h.driver.hooks["create"] = fail_with(error)
    await run(h, "a", gpus=1)
    last = h.events.last("a")
    assert h.events.phases("a") == [Phase.CLAIMED, S, Phase.FAILED]
    assert (last.reason, last.message) == (reason, str(error))
    assert h.gpus_held() == {}
    assert closed(h, "a")


async def test_busy_gpus_park_the_job_holding_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.claims.claim(job_id="other", gpus=FOUR_UUIDS, devices=FOUR_UUIDS, driver="x", worker_id="w")
    delivery = h.delivery(job("a", gpus=1))
    await within(h.runner.handle(delivery))
    assert h.events.phases("a") == [Phase.WAITING]
    assert h.events.last("a").reason == "GpusBusy"
    [(parked, delay, _)] = h.queues.parked
    assert (parked.job_id, delay) == ("a", 7)
    assert delivery.processed  # acked: the parked copy is the job now
    assert h.journal.read("a") is None  # not this worker's until it comes back
    assert "a" not in h.gpus_held()
    assert not h.runner.working_on("a")


async def test_a_parked_job_that_waited_too_long_is_unschedulable(tmp_path: Path) -> None:
    h = harness(tmp_path, policy=RunPolicy(gpu_max_wait_seconds=60))
    h.claims.claim(job_id="other", gpus=FOUR_UUIDS, devices=FOUR_UUIDS, driver="x", worker_id="w")
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    await within(h.runner.handle(h.delivery(job("a", gpus=1), waiting_since=an_hour_ago)))
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.FAILED, "Unschedulable")
    assert h.queues.parked == []


async def test_more_gpus_than_the_host_has_is_unschedulable_at_once(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await run(h, "a", gpus=5)
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.FAILED, "Unschedulable")
    assert "5 GPU(s) wanted; host h1 has 4" in last.message


async def test_claimed_gpus_reach_the_sandbox_and_are_freed_after_it_is_gone(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    seen: list[tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = []

    async def look(sandbox_id: str) -> None:
        sandbox = h.driver.sandboxes[sandbox_name("a")]
        seen.append((sandbox.gpu_devices, h.gpus_held()))

    h.driver.hooks["start"] = look
    h.driver.hooks["remove"] = look
    await run(h, "a", gpus=1, gpu_ids=["nvidia.com/gpu=2"])
    assert seen[0] == (("nvidia.com/gpu=2",), {"a": (FOUR_UUIDS[2],)})
    assert seen[1][1] == {"a": (FOUR_UUIDS[2],)}  # still held while the sandbox is removed
    assert h.gpus_held() == {}
    assert h.events.of("a")[0].gpus == ["nvidia.com/gpu=2"]


async def test_an_unexpected_error_fails_the_job_and_removes_its_sandbox_before_its_gpus(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    h.driver.hooks["wait"] = fail_with(RuntimeError("bug"))
    await run(h, "a", gpus=1, run_seconds=60)
    last = h.events.last("a")
    assert (last.phase, last.reason, last.message) == (
        Phase.FAILED,
        "WorkerError",
        "RuntimeError: bug",
    )
    assert h.driver.sandboxes == {}  # not left running with the GPU inside
    assert h.gpus_held() == {}


async def test_a_sandbox_that_cannot_be_removed_keeps_its_gpus_and_open_entry(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    h.driver.hooks["remove"] = fail_with(SandboxError("device busy"))
    await run(h, "a", gpus=1)
    assert h.events.last("a").phase is Phase.SUCCEEDED
    assert "a" in h.gpus_held()
    assert h.journal.open_job_ids() == {"a"}


async def test_a_shutdown_stop_reports_the_job_cancelled(tmp_path: Path) -> None:
    h = harness(tmp_path)

    async def shut_down() -> None:
        assert h.runner.working_on("a")
        stop = StopRequest(Phase.CANCELLED, "StoppedOnShutdown", "worker shut down")
        await h.runner.stop("a", stop)

    await held_at(h, "wait", shut_down, run_seconds=60)
    assert (h.events.last("a").phase, h.events.last("a").reason) == (
        Phase.CANCELLED,
        "StoppedOnShutdown",
    )


# ---- taking over a dead worker's jobs ----


async def dead_workers_job(h: Harness, job_id: str, **job_fields: object) -> None:
    """A job journaled by a worker that died, with its sandbox made and started."""
    taken = job(job_id, **job_fields)  # type: ignore[arg-type]
    h.alive.add("dead")
    entry = h.journal.take(taken, "dead")
    h.alive.discard("dead")
    block = h.driver.parse_config(taken)
    state = await h.driver.create(
        SandboxSpec(
            name=sandbox_name(job_id),
            job_id=job_id,
            worker_id="dead",
            image="none",
            command=tuple(taken.template.command),
            environment={},
            labels={LABEL_JOB_ID: job_id},
            cpu=None,
            memory_bytes=None,
            config=block,
        )
    )
    await h.driver.start(state.sandbox_id)
    h.journal.write(entry.model_copy(update={"sandbox_id": state.sandbox_id}))
    h.driver.calls.clear()


async def take_over_all(h: Harness) -> None:
    for entry in h.journal.take_over_dead(WORKER):
        await within(h.runner.take_over(entry))


async def test_a_taken_over_running_sandbox_is_adopted_and_watched_to_its_end(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    await dead_workers_job(h, "a", run_seconds=0.2, exit_code=4)
    await take_over_all(h)
    assert h.events.phases("a") == [R, Phase.FAILED]
    assert h.events.of("a")[0].reason == "Adopted"
    assert h.events.last("a").exit_code == 4
    assert "create" not in [op for op, _ in h.calls]
    assert closed(h, "a")


async def test_the_stop_policy_stops_a_taken_over_sandbox(tmp_path: Path) -> None:
    h = harness(tmp_path, policy=RunPolicy(takeover=SandboxPolicy.STOP))
    await dead_workers_job(h, "a", run_seconds=60)
    await take_over_all(h)
    assert h.events.phases("a") == [Phase.CANCELLED]  # not adopted: no `running`
    assert h.events.last("a").reason == "StoppedOnTakeover"
    assert [op for op, _ in h.calls][:3] == ["find", "stop", "output"]


async def test_a_taken_over_sandbox_that_ended_is_reported_as_it_ended(tmp_path: Path) -> None:
    h = harness(tmp_path, policy=RunPolicy(takeover=SandboxPolicy.STOP))
    await dead_workers_job(h, "a", exit_code=0)
    sandbox = h.driver.sandboxes[sandbox_name("a")]
    await within(sandbox.ended.wait())
    await take_over_all(h)
    assert h.events.phases("a") == [Phase.SUCCEEDED]


async def test_a_recorded_terminal_event_is_published_again_under_its_id(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    await dead_workers_job(h, "a")
    entry = h.journal.read("a")
    assert entry is not None
    # The dead worker recorded its terminal event and may or may not have sent it.
    event = WorkerIdentity("dead", "inmemory", "h1").event("a", Phase.SUCCEEDED, "Completed")
    h.journal.write(entry.model_copy(update={"terminal": event}))
    await take_over_all(h)
    assert [e.event_id for e in h.events.of("a")] == [event.event_id]
    assert h.driver.sandboxes == {} and closed(h, "a")


async def test_a_sandbox_gone_while_no_worker_watched_is_lost_never_remade(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    await dead_workers_job(h, "a")
    h.driver.sandboxes.clear()
    await take_over_all(h)
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.FAILED, "SandboxLost")
    assert "create" not in [op for op, _ in h.calls]


async def test_a_create_landing_late_is_adopted_not_duplicated(tmp_path: Path) -> None:
    """The dead worker's create was still under way when its job was taken over."""
    h = harness(tmp_path)
    taken = job("a", gpus=1, output="made by the dead worker\n")
    h.alive.add("dead")
    h.journal.take(taken, "dead")
    h.claims.claim(
        job_id="a", gpus=[FOUR_UUIDS[1]], devices=["d1"], driver="inmemory", worker_id="dead"
    )
    h.alive.discard("dead")

    async def lands_now(name: str) -> None:
        h.driver.hooks.pop("create")
        spec = SandboxSpec(
            name=name, job_id="a", worker_id="dead", image="none", command=(),
            environment={}, labels={LABEL_JOB_ID: "a"}, cpu=None, memory_bytes=None,
            config=h.driver.parse_config(taken),
        )  # fmt: skip
        await h.driver.create(spec)
        raise SandboxNameTaken(f"{name} is taken")

    h.driver.hooks["create"] = lands_now
    await take_over_all(h)
    assert h.events.last("a").output == "made by the dead worker\n"
    assert h.events.last("a").phase is Phase.SUCCEEDED
    assert h.events.of("a")[0].gpus == ["d1"]  # the dead worker's claim, taken over
    assert h.gpus_held() == {}


async def test_an_adopted_sandbox_of_a_user_cancelled_job_is_stopped(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await dead_workers_job(h, "a", run_seconds=60)
    h.cancellations.add("a", "while nobody watched")
    await take_over_all(h)
    last = h.events.last("a")
    assert (last.phase, last.reason, last.message) == (
        Phase.CANCELLED,
        "Cancelled",
        "while nobody watched",
    )
    assert h.driver.sandboxes == {}


async def test_counters_count_jobs_started_and_finished(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await run(h, "a")
    await run(h, "b", exit_code=1)
    assert (h.runner.started, h.runner.finished) == (2, 2)
    assert await h.driver.list_sandboxes() == []


# ---- the broker failing around the hand-off and the parking ----


async def test_a_lost_ack_does_not_strand_the_job(tmp_path: Path) -> None:
    h = harness(tmp_path)
    delivery = h.delivery(job("a"))

    async def lost(multiple: bool = False) -> None:
        raise ConnectionError("the channel closed")

    delivery.ack = lost  # type: ignore[method-assign]
    await run_delivery(h, delivery)
    assert h.events.phases("a") == [S, R, Phase.SUCCEEDED]
    assert closed(h, "a")
    await run_delivery(h, h.delivery(job("a")))  # the broker's redelivery of it
    assert [op for op, _ in h.calls].count("create") == 1


async def run_delivery(h: Harness, delivery: Delivery) -> None:
    await within(h.runner.handle(delivery))


async def test_a_job_that_cannot_be_parked_fails_and_is_not_stranded(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.claims.claim(job_id="other", gpus=FOUR_UUIDS, devices=FOUR_UUIDS, driver="x", worker_id="w")

    async def broker_gone(job: Job, *, delay: float, waiting_since: datetime) -> None:
        raise ConnectionError("no broker for two minutes")

    h.queues.park = broker_gone  # type: ignore[method-assign]
    await run(h, "a", gpus=1)
    last = h.events.last("a")
    assert (last.phase, last.reason) == (Phase.FAILED, "WorkerError")
    assert "no broker for two minutes" in last.message
    assert closed(h, "a") and not h.runner.working_on("a")


async def test_a_parked_copy_back_before_its_entry_is_dropped_runs_once(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.claims.claim(job_id="other", gpus=FOUR_UUIDS, devices=FOUR_UUIDS, driver="x", worker_id="w")
    parked = h.queues.park

    async def back_at_once(job: Job, *, delay: float, waiting_since: datetime) -> None:
        await parked(job, delay=delay, waiting_since=waiting_since)
        h.claims.release("other", driver="x")  # the GPUs are free by the time it is back
        await h.runner.handle(h.delivery(job))

    h.queues.park = back_at_once  # type: ignore[method-assign]
    await run(h, "a", gpus=1)
    assert h.events.phases("a") == [Phase.WAITING, Phase.CLAIMED, S, R, Phase.SUCCEEDED]
    assert closed(h, "a")  # not dropped by the first delivery's parking
    assert not h.runner.working_on("a")


# ---- this worker's own jobs that no task runs any more ----


async def test_a_job_whose_run_failed_after_the_hand_off_is_finished_later(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    published = h.events.publish

    async def broker_gone_for_the_end(event: Event) -> None:
        if event.phase.is_terminal:
            raise ConnectionError("gone")
        await published(event)

    h.events.publish = broker_gone_for_the_end  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await run(h, "a")
    [entry] = h.journal.open_entries(WORKER)  # recorded, not published, not cleaned up
    assert entry.terminal is not None and not h.runner.working_on("a")
    h.events.publish = published  # type: ignore[method-assign]
    await within(h.runner.take_over(entry))
    assert h.events.last("a").event_id == entry.terminal.event_id
    assert closed(h, "a") and h.driver.sandboxes == {}


async def test_taking_over_a_job_being_run_here_does_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path)

    async def take_it_over_now() -> None:
        [entry] = h.journal.open_entries(WORKER)
        assert h.runner.working_on("a")
        await h.runner.take_over(entry)

    await held_at(h, "wait", take_it_over_now)
    assert h.events.phases("a") == [S, R, Phase.SUCCEEDED]
    assert [op for op, _ in h.calls].count("start") == 1


async def test_taking_over_an_entry_read_before_its_job_ended_does_nothing(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    await dead_workers_job(h, "a")
    [stale] = h.journal.take_over_dead(WORKER)
    await within(h.runner.take_over(stale))
    ended = len(h.events.events)
    await within(h.runner.take_over(stale))  # read before that run closed it
    assert len(h.events.events) == ended


async def test_a_failed_create_that_left_a_sandbox_removes_it_before_freeing_gpus(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    create = h.driver.create
    held_at_remove: list[dict[str, tuple[str, ...]]] = []

    async def made_then_failed(spec: SandboxSpec[InMemoryBlock]) -> SandboxState:
        await create(spec)
        raise SandboxError("inspecting the new container failed")

    async def note_claims(sandbox_id: str) -> None:
        held_at_remove.append(h.gpus_held())

    h.driver.create = made_then_failed  # type: ignore[method-assign]
    h.driver.hooks["remove"] = note_claims
    await run(h, "a", gpus=1)
    assert h.events.last("a").phase is Phase.FAILED
    assert h.driver.sandboxes == {}
    assert held_at_remove == [{"a": (FOUR_UUIDS[0],)}]
    assert h.gpus_held() == {}


async def test_a_shutdown_stops_only_jobs_with_a_sandbox(tmp_path: Path) -> None:
    h = harness(tmp_path)
    stop = StopRequest(Phase.CANCELLED, "StoppedOnShutdown", "worker shut down")
    await held_at(h, "create", lambda: h.runner.stop_running(stop))
    assert h.events.last("a").phase is Phase.SUCCEEDED  # left to run (or be taken over)


def test_a_stop_before_start_keeps_its_reason_and_a_users_says_before_start() -> None:
    shutdown = StopRequest(Phase.CANCELLED, "StoppedOnShutdown", "worker shut down")
    assert shutdown.before_start().reason == "StoppedOnShutdown"
    assert StopRequest.cancelled("no").before_start().reason == "CancelledBeforeStart"
