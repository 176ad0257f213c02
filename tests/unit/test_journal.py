"""The host journal: one owner per job, open entries apart from closed ones."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from common.models import Job
from workers.journal import AlreadyFinished, JobJournal, OwnedByLiveWorker


def job(job_id: str) -> Job:
    template = {"image": "busybox", "command": ["true"]}
    body = {"job_id": job_id, "driver": "docker", "template": template}
    return Job.model_validate_json(json.dumps(body))  # as it comes off the queue


def dead(_: str) -> bool:
    return False


def alive(_: str) -> bool:
    return True


def test_two_deliveries_of_one_job_give_it_one_owner(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker")
    journal.take(job("a"), "w1", alive)
    with pytest.raises(OwnedByLiveWorker):
        journal.take(job("a"), "w2", alive)
    assert journal.take(job("a"), "w2", dead).owner == "w2"  # w1 is gone: taken over


def test_a_closed_job_is_not_open_and_refuses_a_late_duplicate(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker")
    entry = journal.take(job("a"), "w1", alive)
    journal.take(job("b"), "w1", alive)
    journal.write(entry.model_copy(update={"closed": True}))
    assert journal.open_job_ids() == {"b"}
    assert not (tmp_path / "docker" / "a.json").exists()
    with pytest.raises(AlreadyFinished):
        journal.take(job("a"), "w2", dead)


def test_a_crash_between_closing_and_unlinking_reads_as_closed(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker")
    entry = journal.take(job("a"), "w1", alive)
    open_copy = (tmp_path / "docker" / "a.json").read_bytes()
    journal.write(entry.model_copy(update={"closed": True}))
    (tmp_path / "docker" / "a.json").write_bytes(open_copy)  # as if the unlink never ran
    read = journal.read("a")
    assert read is not None and read.closed
    assert journal.open_job_ids() == set()
    assert journal.take_orphans("w2", dead) == []


def test_orphans_of_dead_workers_only_are_taken(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker")
    journal.take(job("mine"), "w2", alive)
    journal.take(job("live-peer"), "w3", alive)
    journal.take(job("dead-peer"), "w1", alive)
    taken = journal.take_orphans("w2", lambda worker: worker == "w3")
    assert [e.job.job_id for e in taken] == ["dead-peer"]
    entry = journal.read("dead-peer")
    assert entry is not None and entry.owner == "w2"


def test_prune_removes_only_old_closed_entries(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path, "docker")
    for job_id in ("old-closed", "new-closed", "old-open"):
        entry = journal.take(job(job_id), "w1", alive)
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
    journal = JobJournal(tmp_path, "docker")
    journal.take(job("a"), "w1", alive)
    stale, fresh = tmp_path / "docker" / "b.123.tmp", tmp_path / "docker" / "c.456.tmp"
    stale.write_bytes(b'{"job": ')
    fresh.write_bytes(b'{"job": ')
    minute_ago = time.time() - 61
    os.utime(stale, (minute_ago, minute_ago))
    journal.prune(7 * 86400)
    assert not stale.exists()
    assert fresh.exists()  # perhaps a write under way
    assert journal.open_job_ids() == {"a"}
