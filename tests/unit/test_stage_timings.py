"""Per-stage timings in a worker's terminal events (issue 11): the arithmetic, and the
marks the job runner leaves on the way, with the in-memory driver (no broker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from hypothesis import given
from hypothesis import strategies as st

from sandfleet.common.events import STAGES, Event, Phase
from sandfleet.workers.stage_timings import (
    CLAIMED,
    CREATED,
    CREATING,
    STARTED,
    TAKEN,
    stage_timings,
)
from tests.support.fakes import WORKER, Harness, harness, job

T = TypeVar("T")


async def within(step: Awaitable[T], seconds: float = 5) -> T:
    async with asyncio.timeout(seconds):
        return await step


T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_each_stage_spans_its_two_marks() -> None:
    marks = {TAKEN: at(5), CLAIMED: at(7), CREATING: at(7.5), CREATED: at(10), STARTED: at(11)}
    timings = stage_timings(marks, submitted_at=at(0), waiting_since=None, ended_at=at(20))
    assert timings == {
        "queued": 5.0,
        "gpu_wait": 2.0,
        "creating": 2.5,
        "starting": 1.0,
        "running": 9.0,
    }


def test_a_parked_job_counts_its_wait_from_the_first_time_its_gpus_were_busy() -> None:
    # Taken again at 100 after parks; it first found its GPUs busy at 3.
    marks = {TAKEN: at(100), CLAIMED: at(100.5)}
    timings = stage_timings(marks, submitted_at=at(1), waiting_since=at(3), ended_at=at(101))
    assert timings == {"queued": 2.0, "gpu_wait": 97.5}


def test_stages_never_reached_are_left_out() -> None:
    timings = stage_timings({TAKEN: at(1)}, submitted_at=at(0), waiting_since=None, ended_at=at(2))
    assert timings == {"queued": 1.0}


@given(
    submitted=st.floats(-1e6, 1e6),
    offsets=st.lists(st.floats(-1e6, 1e6), min_size=6, max_size=6),
)
def test_no_stage_is_ever_negative_even_with_clocks_apart(
    submitted: float, offsets: list[float]
) -> None:
    names = [TAKEN, CLAIMED, CREATING, CREATED, STARTED]
    marks = {name: at(offset) for name, offset in zip(names, offsets, strict=False)}
    timings = stage_timings(
        marks, submitted_at=at(submitted), waiting_since=None, ended_at=at(offsets[5])
    )
    assert set(timings) == set(STAGES)
    assert all(seconds >= 0 for seconds in timings.values())


def terminal(h: Harness, job_id: str) -> Event:
    last = h.events.last(job_id)
    assert last.phase.is_terminal
    return last


async def test_a_job_run_here_reports_every_stage(tmp_path: Path) -> None:
    h = harness(tmp_path)
    queued = job("a", gpus=1).model_copy(
        update={"submitted_at": datetime.now(UTC) - timedelta(seconds=60)}
    )
    began = time.monotonic()
    await within(h.runner.handle(h.delivery(queued)))
    elapsed = time.monotonic() - began
    timings = terminal(h, "a").timings
    assert timings is not None and set(timings) == set(STAGES)
    assert 60 <= timings["queued"] < 60 + elapsed + 1
    assert sum(timings[s] for s in STAGES[1:]) <= elapsed


async def test_a_parked_job_reports_its_gpu_wait_across_the_park(tmp_path: Path) -> None:
    h = harness(tmp_path)
    now = datetime.now(UTC)
    queued = job("a", gpus=1).model_copy(update={"submitted_at": now - timedelta(seconds=50)})
    first_busy = (now - timedelta(seconds=30)).isoformat()
    await within(h.runner.handle(h.delivery(queued, waiting_since=first_busy)))
    timings = terminal(h, "a").timings
    assert timings is not None
    assert 19 <= timings["queued"] <= 21
    assert 29 <= timings["gpu_wait"] <= 31


async def test_a_job_without_gpus_reports_no_gpu_wait(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await within(h.runner.handle(h.delivery(job("a"))))
    timings = terminal(h, "a").timings
    assert timings is not None and "gpu_wait" not in timings
    assert set(timings) == set(STAGES) - {"gpu_wait"}


async def test_a_taken_over_job_keeps_the_marks_its_first_worker_wrote(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    now = datetime.now(UTC)
    queued = job("a").model_copy(update={"submitted_at": now - timedelta(seconds=100)})
    h.alive.add("dead")
    entry = h.journal.take(queued, "dead")
    h.alive.discard("dead")
    # The dead worker took it 90 s ago, then died before it made a sandbox.
    h.journal.write(entry.model_copy(update={"stage_marks": {TAKEN: now - timedelta(seconds=90)}}))
    for taken_over in h.journal.take_over_dead(WORKER):
        await within(h.runner.take_over(taken_over))
    last = terminal(h, "a")
    assert last.phase is Phase.SUCCEEDED and last.timings is not None
    assert 9 <= last.timings["queued"] <= 11  # not 100: marked by the first worker
    assert set(last.timings) == set(STAGES) - {"gpu_wait"}
