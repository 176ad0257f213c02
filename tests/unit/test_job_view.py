"""The job view's writer: batches written in order with their offsets, gathered into
few transactions, ended jobs forgotten now and then, and a batch the disk refused kept
for the next pass instead of skipped."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.view_queries import ViewQuery
from sandfleet.gateway import job_view
from sandfleet.gateway.job_view import JobView
from sandfleet.gateway.view_store import ViewStore
from tests.support import eventually


def accepted(job_id: str, **fields: Any) -> Event:
    return Event(job_id=job_id, phase=Phase.ACCEPTED, host="gw", driver="docker", **fields)


def written_offsets(view: JobView) -> asyncio.Queue[int]:
    """The offsets `view` says it has written, as it says them."""
    offsets: asyncio.Queue[int] = asyncio.Queue()
    view.written = offsets.put_nowait
    return offsets


def refuse_once(monkeypatch: pytest.MonkeyPatch, error: sqlite3.Error) -> None:
    """The view's next batch fails with `error` (the disk, a lock); later ones go in."""
    real_apply = ViewStore.apply
    refusals = [error]

    def apply_once_refused(store: ViewStore, *args: Any, **kwargs: Any) -> int:
        if refusals:
            raise refusals.pop()
        return real_apply(store, *args, **kwargs)

    monkeypatch.setattr(ViewStore, "apply", apply_once_refused)


async def listed(view: JobView) -> list[str]:
    reply = await view.answer(ViewQuery(kind="jobs"))
    return sorted(job.job_id for job in reply.jobs or [])


async def test_a_batch_the_disk_refused_is_written_with_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = JobView(tmp_path / "view.sqlite3", log="test", max_age_seconds=3600, host="gw")
    await view.open()
    refuse_once(monkeypatch, sqlite3.OperationalError("disk I/O error"))
    view.record([accepted("a")], 1)
    view.record([], 2)  # a message that is no event still moves the offset
    await view.flushed()
    assert await listed(view) == [] and await view.next_offset() is None
    view.record([accepted("b")], 3)
    await view.flushed()
    assert await listed(view) == ["a", "b"] and await view.next_offset() == 3
    assert view.applied == 2
    await view.aclose()


async def test_events_read_close_together_are_written_in_one_transaction(tmp_path: Path) -> None:
    """Before: each event read while no write ran started a transaction of its own, and a
    live gateway paid a commit (and the forgetting of old jobs) every few events."""
    view = JobView(tmp_path / "view.sqlite3", log="test", max_age_seconds=3600, host="gw")
    await view.open()
    offsets = written_offsets(view)
    for offset, job_id in enumerate("abc", start=1):
        view.record([accepted(job_id)], offset)
        await asyncio.sleep(0)  # the event loop runs between messages, as when following
    assert await asyncio.wait_for(offsets.get(), timeout=5) == 3  # unasked: FLUSH_SECONDS
    assert view.batches == 1 and await listed(view) == ["a", "b", "c"]
    await view.aclose()


async def test_a_full_batch_is_written_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_view, "FLUSH_SECONDS", 3600.0)
    monkeypatch.setattr(job_view, "FLUSH_EVENTS", 2)
    view = JobView(tmp_path / "view.sqlite3", log="test", max_age_seconds=3600, host="gw")
    await view.open()
    offsets = written_offsets(view)
    view.record([accepted("a")], 1)
    view.record([accepted("b")], 2)
    assert await asyncio.wait_for(offsets.get(), timeout=5) == 2
    await view.aclose()


async def test_ended_jobs_are_forgotten_every_so_often_not_in_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(job_view, "monotonic", lambda: clock[0])
    view = JobView(tmp_path / "view.sqlite3", log="test", max_age_seconds=3600, host="gw")
    await view.open()
    old = datetime.fromtimestamp(datetime.now(UTC).timestamp() - 7200, UTC)
    view.record([accepted("first")], 1)
    await view.flushed()  # the first batch looks for old jobs: none yet
    for offset, event in enumerate(
        [accepted("old", timestamp=old),
         Event(job_id="old", phase=Phase.SUCCEEDED, host="w", timestamp=old)], start=2
    ):  # fmt: skip
        view.record([event], offset)
    await view.flushed()
    assert await listed(view) == ["first", "old"]  # looked for a moment ago: kept for now
    clock[0] += job_view.FORGET_EVERY_SECONDS
    view.record([accepted("later")], 4)
    await view.flushed()
    assert await listed(view) == ["first", "later"]
    await view.aclose()


async def test_a_batch_the_disk_refused_is_tried_again_without_another_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet log brings no next event to write the refused batch with."""
    monkeypatch.setattr(job_view, "OFFSET_WRITE_SECONDS", 0.05)
    view = JobView(tmp_path / "view.sqlite3", log="test", max_age_seconds=3600, host="gw")
    await view.open()
    offsets = written_offsets(view)
    refuse_once(monkeypatch, sqlite3.OperationalError("database is locked"))
    view.record([accepted("a")], 1)
    await view.flushed()  # refused
    assert await asyncio.wait_for(offsets.get(), timeout=5) == 1  # and written since
    assert await listed(view) == ["a"]
    await view.aclose()


async def test_a_quiet_view_still_forgets_ended_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches forget ended jobs past the log's age; with no events to write (heartbeats
    have a log of their own), the view still does, and their ids are free again."""
    clock = [1000.0]
    monkeypatch.setattr(job_view, "monotonic", lambda: clock[0])
    monkeypatch.setattr(job_view, "FORGET_EVERY_SECONDS", 0.05)
    view = JobView(tmp_path / "view.sqlite3", log="test", max_age_seconds=3600, host="gw")
    await view.open()
    old = datetime.fromtimestamp(datetime.now(UTC).timestamp() - 7200, UTC)
    view.record([accepted("first")], 1)
    await view.flushed()  # looks for old jobs: none yet
    view.record([accepted("old", timestamp=old)], 2)
    view.record([Event(job_id="old", phase=Phase.SUCCEEDED, host="w", timestamp=old)], 3)
    await view.flushed()
    assert await listed(view) == ["first", "old"]  # looked for a moment ago: kept for now
    clock[0] += 1.0  # past FORGET_EVERY_SECONDS, and nothing more is read

    async def forgotten() -> bool:
        return await listed(view) == ["first"]

    await eventually(forgotten, timeout=5)
    await view.aclose()
