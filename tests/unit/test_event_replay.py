"""After a reconnection, a publisher sends its recent events again (a stream can lose
what it confirmed around a leader change): the same events, once each, heartbeats
and old ones left out."""

from __future__ import annotations

from typing import Any

import pytest

from sandfleet.common import event_replay
from sandfleet.common.event_replay import ReplayedEvents
from sandfleet.common.events import Event, Phase


class Sink:
    def __init__(self) -> None:
        self.published: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.published.append(event)


class Connection:
    def __init__(self) -> None:
        self.reconnect_callbacks: set[Any] = set()


def event(job_id: str | None, phase: Phase) -> Event:
    return Event(job_id=job_id, phase=phase, host="h", driver="docker")


async def test_recent_events_are_published_again_with_their_ids() -> None:
    sink = Sink()
    replayed = ReplayedEvents(sink, Connection())  # type: ignore[arg-type]
    sent = [event("a", Phase.ACCEPTED), event(None, Phase.HEARTBEAT), event("a", Phase.SUCCEEDED)]
    for each in sent:
        await replayed.publish(each)
    assert await replayed.replay() == 2
    assert [e.event_id for e in sink.published[3:]] == [sent[0].event_id, sent[2].event_id]


async def test_events_older_than_the_window_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    sink = Sink()
    replayed = ReplayedEvents(sink, Connection())  # type: ignore[arg-type]
    await replayed.publish(event("old", Phase.SUCCEEDED))
    now[0] += event_replay.REPLAY_WINDOW_SECONDS + 1
    await replayed.publish(event("new", Phase.SUCCEEDED))
    assert await replayed.replay() == 1
    assert sink.published[-1].job_id == "new"


def test_a_reconnection_is_what_starts_a_replay() -> None:
    connection = Connection()
    replayed = ReplayedEvents(Sink(), connection)  # type: ignore[arg-type]
    assert connection.reconnect_callbacks == {replayed._after_reconnect}
