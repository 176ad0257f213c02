"""The job view's writer: batches written in order with their offsets, and a batch the
disk refused kept for the next pass instead of skipped."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.view_queries import ViewQuery
from sandfleet.gateway.job_view import JobView
from sandfleet.gateway.view_store import ViewStore


def accepted(job_id: str) -> Event:
    return Event(job_id=job_id, phase=Phase.ACCEPTED, host="gw", driver="docker")


async def listed(view: JobView) -> list[str]:
    reply = await view.answer(ViewQuery(kind="jobs"))
    return sorted(job.job_id for job in reply.jobs or [])


async def test_a_batch_the_disk_refused_is_written_with_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = JobView(tmp_path / "view.sqlite3", log="test", max_age_seconds=3600, host="gw")
    await view.open()
    real_apply = ViewStore.apply
    refusals = [sqlite3.OperationalError("disk I/O error")]

    def apply_once_refused(store: ViewStore, *args: Any, **kwargs: Any) -> int:
        if refusals:
            raise refusals.pop()
        return real_apply(store, *args, **kwargs)

    monkeypatch.setattr(ViewStore, "apply", apply_once_refused)
    view.record(accepted("a"), 1)
    view.record(None, 2)  # a message that is no event still moves the offset
    await view.flushed()
    assert await listed(view) == [] and await view.next_offset() is None
    view.record(accepted("b"), 3)
    await view.flushed()
    assert await listed(view) == ["a", "b"] and await view.next_offset() == 3
    assert view.applied == 2
    await view.aclose()
