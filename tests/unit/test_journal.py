"""The host journal: one owner per job, open entries apart from closed ones."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sandfleet.common.models import Job
from sandfleet.workers.journal import AlreadyFinished, JobJournal, OwnedByLiveWorker


def job(job_id: str) -> Job:
    template = {"image": "busybox", "command": ["true"]}
    body = {"job_id": job_id, "driver": "docker", "template": template}
    return Job.model_validate_json(json.dumps(body))  # as it comes off the queue


class Workers:
    """Which workers of the host are alive: the journal's `alive`."""

    def __init__(self, *alive: str) -> None:
        self.alive = set(alive)

    def __call__(self, worker_id: str) -> bool:
        return worker_id in self.alive


def test_two_deliveries_of_one_job_give_it_one_owner(tmp_path: Path) -> None:
    workers = Workers("w1", "w2")
    journal = JobJournal(tmp_path, "docker", alive=workers)
    journal.take(job("a"), "w1")
    with pytest.raises(OwnedByLiveWorker):
        journal.take(job("a"), "w2")
    workers.alive.discard("w1")
    assert journal.take(job("a"), "w2").owner == "w2"  # w1 is gone: taken over


def test_a_closed_job_is_not_open_and_refuses_a_late_duplicate(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker", alive=Workers("w2"))
    entry = journal.take(job("a"), "w1")
    journal.take(job("b"), "w1")
    journal.write(entry.model_copy(update={"closed": True}))
    assert journal.open_job_ids() == {"b"}
    assert not (tmp_path / "docker" / "a.json").exists()
    with pytest.raises(AlreadyFinished):
        journal.take(job("a"), "w2")


def test_a_parked_jobs_wait_is_kept(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker", alive=Workers("w1"))
    since = datetime(2026, 1, 2, tzinfo=UTC)
    journal.take(job("a"), "w1", waiting_since=since)
    entry = journal.read("a")
    assert entry is not None and entry.waiting_since == since


def test_a_crash_between_closing_and_unlinking_reads_as_closed(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker", alive=Workers("w2"))
    entry = journal.take(job("a"), "w1")
    open_copy = (tmp_path / "docker" / "a.json").read_bytes()
    journal.write(entry.model_copy(update={"closed": True}))
    (tmp_path / "docker" / "a.json").write_bytes(open_copy)  # as if the unlink never ran
    read = journal.read("a")
    assert read is not None and read.closed
    assert journal.open_job_ids() == set()
    assert journal.take_over_dead("w2") == []


def test_only_dead_workers_jobs_are_taken_over(tmp_path: Path) -> None:
    workers = Workers("w1", "w2", "w3")
    journal = JobJournal(tmp_path, "docker", alive=workers)
    journal.take(job("mine"), "w2")
    journal.take(job("live-peer"), "w3")
    journal.take(job("dead-peer"), "w1")
    workers.alive.discard("w1")
    taken = journal.take_over_dead("w2")
    assert [e.job.job_id for e in taken] == ["dead-peer"]
    entry = journal.read("dead-peer")
    assert entry is not None and entry.owner == "w2"


def test_prune_removes_only_old_closed_entries(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker", alive=Workers("w1"))
    for job_id in ("old-closed", "new-closed", "old-open"):
        entry = journal.take(job(job_id), "w1")
        if job_id.endswith("closed"):
            journal.write(entry.model_copy(update={"closed": True}))
    week_ago = time.time() - 8 * 86400
    for path in (
        tmp_path / "docker" / "closed" / "old-closed.json",
        tmp_path / "docker" / "old-open.json",
    ):
        os.utime(path, (week_ago, week_ago))
    assert journal.prune(7 * 86400) == 1
    assert journal.read("old-closed") is None
    assert journal.read("new-closed") is not None
    assert journal.open_job_ids() == {"old-open"}


def test_prune_removes_half_written_entries_of_killed_writers(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker", alive=Workers("w1"))
    journal.take(job("a"), "w1")
    stale, fresh = tmp_path / "docker" / "b.123.tmp", tmp_path / "docker" / "c.456.tmp"
    stale.write_bytes(b'{"job": ')
    fresh.write_bytes(b'{"job": ')
    minute_ago = time.time() - 61
    os.utime(stale, (minute_ago, minute_ago))
    journal.prune(7 * 86400)
    assert not stale.exists()
    assert fresh.exists()  # perhaps a write under way
    assert journal.open_job_ids() == {"a"}


def test_a_parked_entry_is_taken_by_its_copy_whoever_owns_it(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker", alive=Workers("w1", "w2"))
    entry = journal.take(job("a"), "w1")
    journal.write(entry.model_copy(update={"parked": True}))
    taken = journal.take(job("a"), "w2")  # w1 is alive, but the job is parked
    assert (taken.owner, taken.parked) == ("w2", False)
    assert journal.unpark("a", "w1") is None  # w1 lost it to its copy
    assert not journal.drop_parked("a", "w1")
    assert journal.read("a") is not None


def test_the_owner_drops_or_unparks_its_own_parked_entry(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker", alive=Workers("w1"))
    for job_id in ("a", "b"):
        entry = journal.take(job(job_id), "w1")
        journal.write(entry.model_copy(update={"parked": True}))
    assert journal.drop_parked("a", "w1")
    assert journal.read("a") is None
    unparked = journal.unpark("b", "w1")
    assert unparked is not None and not unparked.parked
    assert [e.job.job_id for e in journal.open_entries("w1")] == ["b"]
    assert journal.open_entries("w2") == []
