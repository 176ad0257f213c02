"""The gateway's job index stays bounded: by the event log's age and by a count, the
oldest finished jobs forgotten first, a live job only once no finished one is left."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from aio_pika.abc import AbstractChannel

from sandfleet.common.events import Event, Phase
from sandfleet.gateway.job_index import JobIndex, JobRecord, JobRecords

DAY = 86400.0


@dataclass(frozen=True)
class LogMessage:
    body: bytes
    routing_key: str | None


def logged(event: Event, routing_key: str | None = None) -> LogMessage:
    """`event` as read from the log, under its own routing key unless told otherwise."""
    return LogMessage(event.model_dump_json().encode(), routing_key or event.routing_key)


async def test_an_id_is_owned_by_whom_the_gateway_accepted_it_for() -> None:
    index = JobIndex(cast(AbstractChannel, None))
    for phase, who in [(Phase.ACCEPTED, "alice"), (Phase.RUNNING, "mallory")]:
        event = Event(job_id="j", phase=phase, host="h", submitted_by=who)
        await index._on_message(logged(event), True)
    # no `accepted` (a rejection, a worker's word), or under another key: no record
    for event, key in [
        (Event(job_id="k", phase=Phase.REJECTED, host="h", submitted_by="mallory"), None),
        (Event(job_id="m", phase=Phase.RUNNING, host="h", submitted_by="mallory"), None),
        (Event(job_id="n", phase=Phase.ACCEPTED, host="h"), "accepted.none.other"),
    ]:
        await index._on_message(logged(event, key), True)
    assert index.owner("j") == "alice"
    assert not any(index.known(job_id) for job_id in "kmn")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def records(max_entries: int = 100, clock: Clock | None = None) -> JobRecords:
    return JobRecords(max_age_seconds=7 * DAY, max_entries=max_entries, clock=clock or Clock())


def test_the_index_never_holds_more_than_max_entries() -> None:
    # Before: the index kept every job id it ever saw, for the gateway's whole life.
    index = JobIndex(cast(AbstractChannel, None), max_entries=100)
    for n in range(1000):
        index.reserve(f"j{n}", "alice")
    assert index.existing("j999") is Phase.ACCEPTED
    assert sum(index.existing(f"j{n}") is not None for n in range(1000)) == 100


def test_finished_jobs_are_forgotten_before_live_ones() -> None:
    clock = Clock()
    table = records(max_entries=3, clock=clock)
    table.put("live-old", JobRecord(phase=Phase.RUNNING, seen_at=clock.now))
    table.put("done-1", JobRecord(phase=Phase.SUCCEEDED, seen_at=clock.now))
    table.put("done-2", JobRecord(phase=Phase.FAILED, seen_at=clock.now))
    table.put("live-new", JobRecord(phase=Phase.ACCEPTED, seen_at=clock.now))
    assert table.get("done-1") is None  # the oldest finished one, not the oldest of all
    assert table.get("live-old") is not None
    table.put("live-3", JobRecord(phase=Phase.WAITING, seen_at=clock.now))
    assert table.get("done-2") is None
    assert len(table) == 3
    table.put("live-4", JobRecord(phase=Phase.RUNNING, seen_at=clock.now))
    assert table.get("live-old") is None  # only live jobs left: the oldest of them goes
    assert [table.get(j) is not None for j in ("live-new", "live-3", "live-4")] == [True] * 3


def test_finished_jobs_older_than_the_log_keeps_are_forgotten() -> None:
    clock = Clock()
    table = records(clock=clock)
    table.put("done", JobRecord(phase=Phase.SUCCEEDED, seen_at=clock.now))
    table.put("live", JobRecord(phase=Phase.RUNNING, seen_at=clock.now))
    clock.now += 7 * DAY + 1
    table.put("new", JobRecord(phase=Phase.CANCELLED, seen_at=clock.now))
    assert table.get("done") is None
    # A job still running past the log's age keeps its id: reused, it would run twice.
    assert table.get("live") is not None
    assert table.get("new") is not None


def test_a_record_moves_between_live_and_finished_and_keeps_one_entry() -> None:
    clock = Clock()
    table = records(max_entries=2, clock=clock)
    table.put("a", JobRecord(phase=Phase.ACCEPTED, seen_at=clock.now))
    ended = JobRecord(phase=Phase.SUCCEEDED, seen_at=clock.now, owner="alice")
    table.put("a", ended)
    assert len(table) == 1
    assert table.get("a") == ended
    table.pop("a")
    assert table.get("a") is None and len(table) == 0


async def test_events_replayed_from_the_log_are_bounded_by_their_own_age() -> None:
    index = JobIndex(cast(AbstractChannel, None), max_age_seconds=DAY)
    now = datetime.now(UTC).timestamp()
    for job_id, phase, age in [("old", Phase.SUCCEEDED, 2 * DAY), ("recent", Phase.FAILED, 0)]:
        for step in (Phase.ACCEPTED, phase):
            at = datetime.fromtimestamp(now - age, UTC)
            event = Event(job_id=job_id, phase=step, host="h", timestamp=at)
            await index._on_message(logged(event), False)
    assert index.existing("old") is None
    assert index.existing("recent") is Phase.FAILED
