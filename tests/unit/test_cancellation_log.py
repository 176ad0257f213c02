"""The worker's table of user cancellations is bounded the way the control log is."""

from __future__ import annotations

import secrets
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import cast

from aio_pika.abc import AbstractChannel
from hypothesis import given
from hypothesis import strategies as st

from sandfleet.common.models import CancelRequest
from sandfleet.common.settings import max_age_seconds
from sandfleet.workers.cancellations import CancellationLog


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def log(clock: Clock, *, max_age: float = 3600, max_entries: int = 100) -> CancellationLog:
    return CancellationLog(
        cast(AbstractChannel, None), max_age_seconds=max_age, max_entries=max_entries, clock=clock
    )


def cancel(job_id: str, at: float) -> CancelRequest:
    return CancelRequest(job_id=job_id, requested_at=datetime.fromtimestamp(at, UTC))


def test_a_cancellation_is_known_until_the_log_would_have_dropped_it() -> None:
    clock = Clock()
    table = log(clock)
    assert table.record(cancel("a", clock.now))
    assert table.get("a") is not None
    clock.now += 3599
    assert table.get("a") is not None
    clock.now += 2
    assert table.get("a") is None
    assert len(table) == 0


def test_a_cancellation_older_than_the_log_keeps_is_not_kept() -> None:
    clock = Clock()
    table = log(clock)
    assert not table.record(cancel("a", clock.now - 7200))
    assert table.get("a") is None


def test_a_requester_clock_in_the_future_does_not_keep_it_forever() -> None:
    clock = Clock()
    table = log(clock)
    table.record(cancel("a", clock.now + 10 * 365 * 86400))
    clock.now += 3601
    assert table.get("a") is None


def test_the_table_holds_at_most_max_entries_oldest_forgotten_first() -> None:
    clock = Clock()
    table = log(clock, max_entries=3)
    for n in range(5):
        table.record(cancel(f"j{n}", clock.now))
    assert len(table) == 3
    assert [table.get(f"j{n}") is not None for n in range(5)] == [False, False, True, True, True]


def test_a_repeated_cancellation_counts_from_its_latest_request() -> None:
    clock = Clock()
    table = log(clock, max_entries=2)
    table.record(cancel("a", clock.now))
    table.record(cancel("b", clock.now))
    table.record(cancel("a", clock.now))  # again: now the newest
    table.record(cancel("c", clock.now))
    assert table.get("a") is not None and table.get("b") is None


def test_max_age_reads_rabbitmq_units() -> None:
    assert max_age_seconds("7D") == 7 * 86400
    assert max_age_seconds("12h") == 12 * 3600
    assert max_age_seconds("90s") == 90
    assert (
        timedelta(seconds=max_age_seconds("1Y")).days,
        timedelta(seconds=max_age_seconds("1M")).days,
    ) == (365, 30)


def test_a_flood_of_cancellations_for_random_ids_stays_within_the_bound() -> None:
    """A submitter may cancel any id, even ones that never ran: memory must not follow."""
    clock, bound = Clock(), 1000
    table = log(clock, max_entries=bound)
    longest = "x" * 512  # CancelRequest.reason's limit

    def flood(count: int) -> None:
        for _ in range(count):
            job_id = secrets.token_hex(31)  # 62 characters: near the id pattern's limit
            table.record(CancelRequest(job_id=job_id, reason=longest, requested_at=now(clock)))

    tracemalloc.start()
    try:
        flood(2 * bound)  # the table is full: from here on each new one pushes one out
        full = tracemalloc.take_snapshot()
        flood(20 * bound)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(full, "filename"))
    assert len(table) == bound
    assert grown < 64 * 1024  # 20,000 more, of ~1 KiB each, and nothing kept of them


NEAR_NOW = (datetime(2026, 11, 26, 23), datetime(2026, 11, 27, 1))  # around Clock's now


@given(
    st.lists(
        st.tuples(
            st.text("abcdefgh", min_size=1, max_size=2),
            st.datetimes(timezones=st.timezones() | st.just(UTC))  # any at all
            | st.datetimes(NEAR_NOW[0], NEAR_NOW[1], timezones=st.just(UTC)),  # kept a while
        ),
        max_size=40,
    )
)
def test_any_requests_at_any_time_keep_the_table_within_max_entries(
    requests: list[tuple[str, datetime]],
) -> None:
    clock = Clock()
    table = log(clock, max_entries=5)
    for job_id, requested_at in requests:
        table.record(CancelRequest(job_id=job_id, requested_at=requested_at))
        assert len(table) <= 5
    clock.now += 3601
    assert all(table.get(job_id) is None for job_id, _ in requests)
    assert len(table) == 0


def now(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.now, UTC)
