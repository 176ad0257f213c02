"""Each job's latest event is published again a while later (a stream can lose what it
confirmed around a leader change): the same event, once, only the latest per job, not
heartbeats, and only those the publisher picks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from sandfleet.common import event_replay
from sandfleet.common.event_replay import ECHO_AFTER_SECONDS, ECHO_WINDOW, EchoedEvents
from sandfleet.common.events import Event, Phase
from sandfleet.gateway.job_rules import counts


class Sink:
    def __init__(self) -> None:
        self.published: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.published.append(event)

    async def publish_many(self, events: Sequence[Event]) -> None:
        self.published.extend(events)


def fresh(sink: Sink) -> Callable[[], AbstractAsyncContextManager[Sink]]:
    """The echo's own publisher: here the same sink, on no channel."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[Sink]:
        yield sink

    return opened


def event(job_id: str | None, phase: Phase) -> Event:
    return Event(job_id=job_id, phase=phase, host="h", driver="docker")


LATER = ECHO_AFTER_SECONDS + 1


async def test_each_jobs_latest_event_is_echoed_once_with_its_id() -> None:
    sink = Sink()
    echoed = EchoedEvents(sink, fresh(sink))
    sent = [
        event("a", Phase.STARTING),
        event(None, Phase.HEARTBEAT),
        event("b", Phase.RUNNING),
        event("a", Phase.SUCCEEDED),
    ]
    for each in sent:
        await echoed.publish(each)
    assert await echoed.echo_due(now=time.monotonic() + LATER) == 2
    assert [e.event_id for e in sink.published[4:]] == [sent[2].event_id, sent[3].event_id]
    assert await echoed.echo_due(now=time.monotonic() + 2 * LATER) == 0  # once


async def test_nothing_is_echoed_before_its_time() -> None:
    sink = Sink()
    echoed = EchoedEvents(sink, fresh(sink))
    await echoed.publish(event("a", Phase.SUCCEEDED))
    assert await echoed.echo_due() == 0
    assert await echoed.echo_due(now=time.monotonic() + LATER) == 1


async def test_only_the_events_echo_picks_are_echoed() -> None:
    sink = Sink()

    async def echo(e: Event) -> bool:
        return e.job_id == "lost"

    echoed = EchoedEvents(sink, fresh(sink), echo=echo)
    await echoed.publish(event("kept", Phase.ACCEPTED))
    await echoed.publish(event("lost", Phase.ACCEPTED))
    assert await echoed.echo_due(now=time.monotonic() + LATER) == 1
    assert sink.published[-1].job_id == "lost"


async def test_the_echo_loop_stops_with_the_publisher() -> None:
    sink = Sink()
    async with EchoedEvents(sink, fresh(sink)) as echoed:
        assert echoed._echoing is not None and not echoed._echoing.done()
    assert echoed._echoing is None


def test_an_echo_never_takes_a_job_back() -> None:
    """What readers of the log (the job index and view) do with an echoed event."""
    assert counts(None, event("a", Phase.ACCEPTED))
    assert not counts(Phase.RUNNING, event("a", Phase.ACCEPTED))  # the acceptance again
    assert not counts(Phase.SUCCEEDED, event("a", Phase.RUNNING))  # a word from before
    assert counts(Phase.RUNNING, event("a", Phase.SUCCEEDED))
    assert counts(Phase.SUCCEEDED, event("a", Phase.SUCCEEDED))  # the end again: same end


async def test_a_round_echoes_many_jobs_each_once() -> None:
    """More than one window of echoes in flight (a busy gateway's 30 s of `accepted`)."""
    sink = Sink()
    echoed = EchoedEvents(sink, fresh(sink))
    sent = [event(f"job-{n}", Phase.ACCEPTED) for n in range(3 * ECHO_WINDOW + 5)]
    for each in sent:
        await echoed.publish(each)
    assert await echoed.echo_due(now=time.monotonic() + LATER) == len(sent)
    again = sorted(e.event_id for e in sink.published[len(sent) :])
    assert again == sorted(e.event_id for e in sent)
    assert await echoed.echo_due(now=time.monotonic() + 2 * LATER) == 0


async def test_past_the_bound_the_oldest_go_unechoed_and_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_replay, "MAX_REMEMBERED_JOBS", 10)
    sink = Sink()
    echoed = EchoedEvents(sink, fresh(sink))
    for n in range(15):
        await echoed.publish(event(f"job-{n}", Phase.ACCEPTED))
    assert echoed.unechoed == 5
    assert await echoed.echo_due(now=time.monotonic() + LATER) == 10
    assert {e.job_id for e in sink.published[15:]} == {f"job-{n}" for n in range(5, 15)}
