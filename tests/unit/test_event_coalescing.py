"""Events handed over in one pass of the event loop are published together; each caller
returns once its own event is confirmed, and learns of its own failure."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sandfleet.common.event_coalescing import CoalescedEvents
from sandfleet.common.events import Event, Phase


class Publisher:
    """Records each publish_many; each waits until `confirm` is set (or raises `fail`)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.confirm = asyncio.Event()
        self.fail: Exception | None = None
        self.called = asyncio.Event()  # set by each publish_many

    async def next_call(self) -> list[str]:
        async with asyncio.timeout(5):
            await self.called.wait()
        self.called.clear()
        return self.calls[-1]

    async def publish(self, event: Event) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: Sequence[Event]) -> None:
        self.calls.append([event.job_id or "" for event in events])
        self.called.set()
        await self.confirm.wait()
        if self.fail is not None:
            raise self.fail


def accepted(job_id: str) -> Event:
    return Event(job_id=job_id, phase=Phase.ACCEPTED, host="gw", driver="docker")


async def test_events_of_one_pass_go_together_and_each_caller_waits_for_the_confirm() -> None:
    publisher = Publisher()
    events = CoalescedEvents(publisher)
    callers = [asyncio.create_task(events.publish(accepted(f"j{n}"))) for n in range(3)]
    assert await publisher.next_call() == ["j0", "j1", "j2"]
    assert not any(caller.done() for caller in callers)  # not before the confirm
    later = asyncio.create_task(events.publish(accepted("later")))
    assert await publisher.next_call() == ["later"]  # a later pass: a message of its own
    publisher.confirm.set()
    async with asyncio.timeout(5):
        await asyncio.gather(*callers, later)


async def test_a_failed_publish_fails_every_caller_of_its_batch() -> None:
    publisher = Publisher()
    publisher.fail = ConnectionError("broker away")
    publisher.confirm.set()
    events = CoalescedEvents(publisher)
    outcomes = await asyncio.gather(
        events.publish(accepted("a")), events.publish(accepted("b")), return_exceptions=True
    )
    assert [type(outcome) for outcome in outcomes] == [ConnectionError, ConnectionError]


async def test_a_cancelled_caller_leaves_the_others_confirmed() -> None:
    publisher = Publisher()
    events = CoalescedEvents(publisher)
    gone = asyncio.create_task(events.publish(accepted("gone")))
    stays = asyncio.create_task(events.publish(accepted("stays")))
    await publisher.next_call()
    gone.cancel()
    publisher.confirm.set()
    async with asyncio.timeout(5):
        await stays
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert publisher.calls == [["gone", "stays"]]


async def test_closing_cancels_the_publishes_in_flight_and_their_callers() -> None:
    publisher = Publisher()
    events = CoalescedEvents(publisher)
    caller = asyncio.create_task(events.publish(accepted("a")))
    await publisher.next_call()
    await events.aclose()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await caller


async def test_closing_before_the_pass_ends_cancels_the_waiting_callers_and_sends_nothing() -> None:
    publisher = Publisher()
    events = CoalescedEvents(publisher)
    caller = asyncio.create_task(events.publish(accepted("a")))
    await asyncio.sleep(0)  # the caller has handed its event over; the pass has not ended
    await events.aclose()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await caller
    assert publisher.calls == []
    with pytest.raises(ConnectionError):
        await events.publish(accepted("after"))
