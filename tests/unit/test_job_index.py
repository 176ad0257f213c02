"""The gateway's job index over its SQLite job view: who owns an id, what it costs (its
memory holds no written job; heartbeats go unread), forgetting by age, and settling which
of several gateways' `accepted` events took an id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractChannel

from sandfleet.common.event_batches import packed
from sandfleet.common.events import Event, Phase
from sandfleet.gateway.job_index import JobIndex
from sandfleet.gateway.job_view import JobView

DAY = 86400.0
LOG = "broker v sandfleet.events.log"


@dataclass(frozen=True)
class LogMessage:
    body: bytes
    routing_key: str | None
    type: str | None = None


def logged(event: Event, routing_key: str | None = None) -> LogMessage:
    """`event` as read from the log, under its own routing key unless told otherwise."""
    return LogMessage(event.model_dump_json().encode(), routing_key or event.routing_key)


def accepted(job_id: str, who: str = "alice", **fields: Any) -> Event:
    return Event(job_id=job_id, phase=Phase.ACCEPTED, host="gw", submitted_by=who, **fields)


class Reader:
    """A job index and its view on one file, fed messages as a follower would."""

    def __init__(self, path: Path, *, max_age_seconds: float = 7 * DAY, **index: Any) -> None:
        self.view = JobView(path, log=LOG, max_age_seconds=max_age_seconds, host="gw")
        self.index = JobIndex(cast(AbstractChannel, None), self.view, **index)
        self.offset = 0

    def read(self, *events: Event | LogMessage) -> None:
        for event in events:
            self.offset += 1
            message = logged(event) if isinstance(event, Event) else event
            self.index.take(message, self.offset)


@pytest.fixture
async def reader(tmp_path: Path) -> AsyncIterator[Reader]:
    reader = Reader(tmp_path / "view.sqlite3")
    await reader.view.open()
    yield reader
    await reader.view.aclose()


async def test_an_id_is_owned_by_whom_the_gateway_accepted_it_for(reader: Reader) -> None:
    index = reader.index
    reader.read(accepted("j"), Event(job_id="j", phase=Phase.RUNNING, host="h", submitted_by="m"))
    # no `accepted` (a rejection, a worker's word), or under another key: no record
    reader.read(
        Event(job_id="k", phase=Phase.REJECTED, host="h", submitted_by="mallory"),
        Event(job_id="m", phase=Phase.RUNNING, host="h", submitted_by="mallory"),
        logged(accepted("n", "mallory"), "accepted.none.other"),
    )
    assert index.owner("j") == "alice" and index.existing("j") is Phase.RUNNING
    assert not any(index.known(job_id) for job_id in "kmn")
    await reader.view.flushed()  # the same answers, now from the view's file
    assert index.owner("j") == "alice" and index.existing("j") is Phase.RUNNING
    assert not any(index.known(job_id) for job_id in "kmn")


async def test_written_jobs_leave_memory_and_are_answered_from_the_file(
    reader: Reader, tmp_path: Path
) -> None:
    # Before: every job of the view was loaded into a dict at start-up and kept there.
    reader.read(*(accepted(f"j{n}") for n in range(1000)))
    assert len(reader.index._unwritten) == 1000
    await reader.view.flushed()
    assert reader.index._unwritten == {}
    assert all(reader.index.existing(f"j{n}") is Phase.ACCEPTED for n in range(1000))
    restarted = Reader(tmp_path / "view.sqlite3")
    await restarted.view.open()
    try:  # a new index knows them without reading the log or loading anything
        assert restarted.index.owner("j999") == "alice"
        assert await restarted.view.next_offset() == 1000
    finally:
        await restarted.view.aclose()


async def test_heartbeats_are_skipped_unread_and_only_move_the_offset(reader: Reader) -> None:
    beat = Event(job_id=None, phase=Phase.HEARTBEAT, host="w1", driver="docker")
    # Unparseable under a heartbeat's key: never decoded, so never even noticed.
    reader.read(logged(beat), LogMessage(b"not json", "heartbeat.docker.w1"))
    assert (reader.index.skipped, reader.index.read) == (2, 0)
    assert reader.view.batches == 0  # no transaction per heartbeat: the offset waits
    await reader.view.flushed()
    assert await reader.view.next_offset() == 2 and reader.view.batches == 1
    reader.read(accepted("j"))  # an event is read, and a heartbeat's key on it is no excuse
    assert (reader.index.skipped, reader.index.read) == (2, 1)


async def test_ended_jobs_are_forgotten_as_old_as_the_log_keeps(tmp_path: Path) -> None:
    reader = Reader(tmp_path / "view.sqlite3", max_age_seconds=DAY)
    await reader.view.open()
    now = datetime.now(UTC).timestamp()
    for job_id, end, age in [
        ("old", Phase.SUCCEEDED, 2 * DAY), ("recent", Phase.FAILED, 0), ("old-live", None, 2 * DAY)
    ]:  # fmt: skip
        at = datetime.fromtimestamp(now - age, UTC)
        reader.read(accepted(job_id, timestamp=at))
        if end is not None:
            reader.read(Event(job_id=job_id, phase=end, host="h", timestamp=at))
    await reader.view.flushed()
    assert reader.index.existing("old") is None
    assert reader.index.existing("recent") is Phase.FAILED
    # A job still live past the log's age keeps its id: reused, it would run twice.
    assert reader.index.existing("old-live") is Phase.ACCEPTED
    await reader.view.aclose()


async def test_the_first_accepted_in_the_log_takes_the_id(reader: Reader) -> None:
    index = reader.index
    mine, theirs = accepted("x"), accepted("x")
    index.reserve("x", "alice")
    assert index.existing("x") is Phase.ACCEPTED  # twins here see the reservation
    reader.read(theirs, mine)  # another gateway's came first
    assert not await index.settled("x", mine.event_id)
    assert index.accepted_by("x") == theirs.event_id
    index.reserve("y", "alice")
    first = accepted("y")
    waiting = asyncio.create_task(index.settled("y", first.event_id))
    await asyncio.sleep(0)
    assert not waiting.done()  # it waits for its event to be read back
    reader.read(first, accepted("y"))
    assert await waiting
    await reader.view.flushed()
    assert index.accepted_by("y") == first.event_id  # so says the file too


async def test_an_unread_accepted_times_out_and_is_settled_when_it_shows(tmp_path: Path) -> None:
    reader = Reader(tmp_path / "view.sqlite3", settle_timeout=0.05)
    await reader.view.open()
    index, lost = reader.index, accepted("x")
    index.reserve("x", "alice")
    with pytest.raises(TimeoutError):
        await index.settled("x", lost.event_id)
    assert index.existing("x") is Phase.ACCEPTED  # still held here
    reader.read(lost, accepted("x"))  # its echo shows, before a twin's
    assert await index.settled("x", lost.event_id)
    await reader.view.aclose()


async def test_a_rejection_frees_an_id_and_only_a_new_accepted_retakes_it(reader: Reader) -> None:
    index, first = reader.index, accepted("x")
    reader.read(first, Event(job_id="x", phase=Phase.REJECTED, host="gw", submitted_by="alice"))
    assert index.existing("x") is None and index.owner("x") == "alice"
    reader.read(first)  # its echo does not retake it
    assert index.existing("x") is None
    again = accepted("x", "bob")
    reader.read(again)
    assert (index.existing("x"), index.owner("x"), index.accepted_by("x")) == (
        Phase.ACCEPTED, "alice", again.event_id,
    )  # fmt: skip
    await reader.view.flushed()  # the view's file agrees
    assert (index.existing("x"), index.owner("x"), index.accepted_by("x")) == (
        Phase.ACCEPTED, "alice", again.event_id,
    )  # fmt: skip


async def test_forgetting_frees_a_reservation_or_an_id_given_up(reader: Reader) -> None:
    index = reader.index
    index.reserve("r", "alice")
    index.forget("r")  # its accept failed: never in the log
    assert not index.known("r")
    won = accepted("w")
    index.reserve("w", "alice")
    reader.read(won)
    assert await index.settled("w", won.event_id)
    index.forget("w")  # unroutable after all: its rejection is on its way
    assert index.existing("w") is None and index.owner("w") == "alice"
    reader.read(Event(job_id="w", phase=Phase.RUNNING, host="h"))  # the log speaks again
    assert index.existing("w") is Phase.RUNNING


async def test_every_event_of_a_packed_message_is_taken(reader: Reader) -> None:
    events = [accepted(f"p{n}", f"owner{n}") for n in range(3)]
    [message] = packed(events)
    reader.read(LogMessage(message.body, message.routing_key, message.message_type))
    assert [reader.index.owner(f"p{n}") for n in range(3)] == ["owner0", "owner1", "owner2"]
    assert reader.index.read == 1
    await reader.view.flushed()
    assert [reader.index.owner(f"p{n}") for n in range(3)] == ["owner0", "owner1", "owner2"]
