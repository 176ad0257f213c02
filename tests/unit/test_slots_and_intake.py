"""Slots and the intake: a worker never takes more jobs than it has free slots, and
a job taken over from a dead worker takes a slot at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from sandfleet.workers.intake import JobIntake
from sandfleet.workers.slots import Slots

Consumer = Callable[[AbstractIncomingMessage], Awaitable[None]]


async def test_queued_jobs_wait_for_a_slot_and_take_it_when_one_ends() -> None:
    slots = Slots(1)
    slots.enqueue()
    await slots.start_queued()
    slots.enqueue()
    assert slots.free == 0
    waiting = asyncio.create_task(slots.start_queued())
    await asyncio.sleep(0)
    assert not waiting.done()
    await slots.finish()
    async with asyncio.timeout(1):
        await waiting
    assert (slots.running, slots.free) == (1, 0)


async def test_a_taken_over_job_starts_at_once_even_past_capacity() -> None:
    slots = Slots(1)
    slots.enqueue()
    await slots.start_queued()
    slots.start_now()
    assert (slots.running, slots.free) == (2, 0)
    await slots.finish()
    assert slots.free == 0  # still at capacity
    await slots.finish()
    assert slots.free == 1


async def test_a_job_that_leaves_the_queue_gives_up_its_place() -> None:
    slots = Slots(1)
    slots.start_now()
    slots.enqueue()
    waiting = asyncio.create_task(slots.start_queued())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.leave_queue()
    await slots.finish()
    assert (slots.running, slots.free) == (0, 1)


def test_a_worker_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Slots(0)


class FakeQueue:
    """A job queue whose consumers the test drives by hand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.consumer: Consumer | None = None
        self.prefetch_at_consume: list[int] = []
        self._channel: FakeChannel | None = None

    async def consume(self, callback: Consumer) -> str:
        assert self.consumer is None, "consuming twice"
        assert self._channel is not None
        self.consumer = callback
        self.prefetch_at_consume.append(self._channel.prefetch)
        return f"tag-{self.name}"

    async def cancel(self, tag: str) -> None:
        self.consumer = None

    async def deliver(self, message: str) -> None:
        assert self.consumer is not None, f"{self.name} is not being consumed"
        await self.consumer(cast(AbstractIncomingMessage, message))


class FakeChannel:
    def __init__(self) -> None:
        self.prefetch = 0

    async def set_qos(self, *, prefetch_count: int) -> None:
        self.prefetch = prefetch_count


class Jobs:
    """The handler: each job runs until the test ends it."""

    def __init__(self) -> None:
        self.running: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.started = asyncio.Condition()

    async def handle(self, message: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks[str(message)] = task
        done = self.running[str(message)] = asyncio.Event()
        async with self.started:
            self.started.notify_all()
        await done.wait()

    async def until_running(self, *names: str) -> None:
        async with asyncio.timeout(2), self.started:
            await self.started.wait_for(lambda: set(names) <= set(self.running))

    def end(self, name: str) -> None:
        self.running.pop(name).set()


def intake(slots: int | Slots) -> tuple[JobIntake, list[FakeQueue], FakeChannel, Jobs]:
    channel, jobs = FakeChannel(), Jobs()
    queues = [FakeQueue("shared"), FakeQueue("host")]
    for queue in queues:
        queue._channel = channel
    made = JobIntake(
        cast(AbstractChannel, channel),
        cast(list[AbstractQueue], queues),
        slots if isinstance(slots, Slots) else Slots(slots),
        jobs.handle,
    )
    return made, queues, channel, jobs


async def until(condition: Callable[[], bool], *, steps: int = 50) -> None:
    """Let the loop run the intake's tasks until `condition` holds (they need no I/O)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the intake never got there")


async def test_consumers_prefetch_the_free_slots_and_stop_when_none_is_free() -> None:
    made, (shared, host), _, jobs = intake(2)
    await made.start()
    assert (shared.prefetch_at_consume, host.prefetch_at_consume) == ([2], [2])
    await shared.deliver("a")
    await host.deliver("b")
    await jobs.until_running("a", "b")
    assert shared.consumer is None and host.consumer is None  # full: no more deliveries
    jobs.end("a")
    await until(lambda: shared.consumer is not None and host.consumer is not None)
    assert shared.prefetch_at_consume == [2, 1]  # one slot free now
    jobs.end("b")
    await until(lambda: not made.in_hand)


async def test_a_delivery_that_raced_in_waits_for_a_slot() -> None:
    made, (shared, host), _, jobs = intake(1)
    await made.start()
    deliver_both = asyncio.gather(shared.deliver("a"), host.deliver("b"))  # both in flight
    await deliver_both
    await jobs.until_running("a")
    await until(lambda: len(made.in_hand) == 2)
    assert "b" not in jobs.running  # in hand, waiting for the slot; never requeued
    jobs.end("a")
    await jobs.until_running("b")
    jobs.end("b")
    await until(lambda: not made.in_hand)


async def test_a_taken_over_job_holds_a_slot_so_no_delivery_is_taken() -> None:
    made, (shared, host), _, _ = intake(1)
    ended = asyncio.Event()

    async def taken_over() -> None:
        await ended.wait()

    made.run_taken_over(taken_over())
    await made.start()  # right after: it sees the slot taken
    assert shared.consumer is None and host.consumer is None
    ended.set()
    await until(lambda: shared.consumer is not None and not made.in_hand)


async def test_after_stop_no_job_is_taken_even_when_slots_free_up() -> None:
    made, (shared, _), _, jobs = intake(2)
    await made.start()
    await shared.deliver("a")
    await jobs.until_running("a")
    await made.stop()
    assert shared.consumer is None
    assert len(made.in_hand) == 1  # the job in hand goes on
    jobs.end("a")
    await until(lambda: not made.in_hand)
    assert shared.consumer is None


async def test_a_delivery_cancelled_while_it_waits_gives_its_place_back() -> None:
    slots = Slots(1)
    made, (shared, host), _, jobs = intake(slots)
    await made.start()
    await asyncio.gather(shared.deliver("a"), host.deliver("b"))  # both in before the pause
    await jobs.until_running("a")
    await until(lambda: len(made.in_hand) == 2)
    [waiting] = made.in_hand - {jobs.tasks["a"]}
    waiting.cancel()  # "b", waiting for the slot "a" holds, as a shutdown cancels it
    jobs.end("a")
    await until(lambda: not made.in_hand)
    assert (slots.running, slots.free) == (0, 1)
    assert "b" not in jobs.running
