"""The host's journal of jobs it has taken on: what lets a job outlive its worker.

A worker acks a job message as soon as the job is journaled here (so no job is held
unacked for hours, past the broker's consumer timeout), and from then on this file
owns it until the job's sandbox is gone:

    <journal_dir>/<driver>/<job_id>.json          open: {job, owner, sandbox_id, terminal, ...}
    <journal_dir>/<driver>/closed/<job_id>.json   over: sandbox removed, GPUs released

Closed entries stay for `journal_retention_seconds`, so a late duplicate delivery of
the same job is recognised and dropped; they live apart so that finding the open
ones (every reconciliation) never reads a week of finished jobs. Workers take over
the open entries of dead workers (their lease is free), at start-up and periodically,
and finish them: adopt the running sandbox, or re-publish a terminal event that was
recorded but perhaps not sent (same event_id: readers drop the repeat), then clean
up. Writes are atomic (write, fsync, rename); taking an entry happens under a flock.
Entries hold the job's environment: they are 0600 in 0700 directories, written and read
as `sandfleet.workers.state_files` says (never through a link).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from sandfleet.common.events import Event
from sandfleet.common.models import Job
from sandfleet.workers.stage_timings import TAKEN
from sandfleet.workers.state_files import (
    UnsafeStatePath,
    fsync_directory,
    open_private,
    private_dir,
    read_private,
    write_private,
)

log = logging.getLogger(__name__)


class JournalEntry(BaseModel):
    job: Job
    owner: str
    sandbox_id: str | None = None
    terminal: Event | None = None  # recorded before it is published
    closed: bool = False  # sandbox removed, GPUs released: kept a while to drop duplicates
    # When the job first found its GPUs busy: it gives up after SANDFLEET_GPU_MAX_WAIT_SECONDS.
    waiting_since: datetime | None = None
    # Being put back in its retry queue (GPUs busy): the copy there may take the entry
    # whoever owns it, even before the owner has dropped it.
    parked: bool = False
    # When the job passed each stage on this host (sandfleet.workers.stage_timings).
    stage_marks: dict[str, datetime] = Field(default_factory=dict)


class OwnedByLiveWorker(Exception):
    """A live worker of this host (maybe this one) holds the job: a duplicate delivery."""


class AlreadyFinished(Exception):
    """The job ran on this host and is over: a duplicate delivery."""


class JobJournal:
    """`alive(worker_id)` says whether a worker of this host still runs (holds its lease)."""

    def __init__(self, directory: Path, driver: str, *, alive: Callable[[str], bool]) -> None:
        self._alive = alive
        self._dir = directory / driver
        self._closed = self._dir / "closed"
        private_dir(self._dir)
        private_dir(self._closed)

    def _path(self, job_id: str, *, closed: bool = False) -> Path:
        return (self._closed if closed else self._dir) / f"{job_id}.json"

    def read(self, job_id: str) -> JournalEntry | None:
        # Closed first: a crash between writing the closed entry and removing the open
        # one leaves both, and the closed one is the later word.
        for closed in (True, False):
            try:
                return JournalEntry.model_validate_json(
                    read_private(self._path(job_id, closed=closed))
                )
            except FileNotFoundError:
                continue
        return None

    def write(self, entry: JournalEntry) -> None:
        job_id = entry.job.job_id
        path = self._path(job_id, closed=entry.closed)
        write_private(path, entry.model_dump_json().encode(), durable=True)
        if entry.closed:
            self._path(job_id).unlink(missing_ok=True)
            fsync_directory(self._dir)

    def delete(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)
        self._path(job_id, closed=True).unlink(missing_ok=True)

    def open_job_ids(self) -> set[str]:
        """Jobs taken on by this host's workers of this driver and not over yet."""
        return {
            path.stem
            for path in self._dir.glob("*.json")
            if not self._path(path.stem, closed=True).exists()
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = open_private(self._dir / ".lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def take(self, job: Job, owner: str, *, waiting_since: datetime | None = None) -> JournalEntry:
        """Make `owner` the job's owner: a new entry, or a dead worker's (taken over).

        Atomic under the journal lock, so of two deliveries of one job on this host,
        exactly one gets it. Raises OwnedByLiveWorker or AlreadyFinished for the other.
        """
        with self._locked():
            entry = self.read(job.job_id)
            if entry is None:
                entry = JournalEntry(
                    job=job,
                    owner=owner,
                    waiting_since=waiting_since,
                    stage_marks={TAKEN: datetime.now(UTC)},
                )
            elif entry.closed:
                raise AlreadyFinished(job.job_id)
            elif not entry.parked and (entry.owner == owner or self._alive(entry.owner)):
                raise OwnedByLiveWorker(f"{job.job_id} is run by {entry.owner}")
            else:  # a dead worker's, or parked: the copy that came back is the job now
                update = {"owner": owner, "parked": False}
                if waiting_since is not None:
                    update["waiting_since"] = waiting_since
                entry = entry.model_copy(update=update)
            self.write(entry)
            return entry

    def unpark(self, job_id: str, owner: str) -> JournalEntry | None:
        """The parked entry back in `owner`'s hands; None if its copy has taken it since."""
        with self._locked():
            entry = self.read(job_id)
            if entry is None or entry.closed or not entry.parked or entry.owner != owner:
                return None
            entry = entry.model_copy(update={"parked": False})
            self.write(entry)
            return entry

    def drop_parked(self, job_id: str, owner: str) -> bool:
        """Delete `owner`'s parked entry (its copy waits in the broker); False if that copy
        has taken it already."""
        with self._locked():
            entry = self.read(job_id)
            if entry is None or entry.closed or not entry.parked or entry.owner != owner:
                return False
            self.delete(job_id)
            return True

    def open_entries(self, owner: str) -> list[JournalEntry]:
        """`owner`'s open entries."""
        return [entry for entry in self._open_entries() if entry.owner == owner]

    def _open_entries(self) -> Iterator[JournalEntry]:
        for job_id in sorted(self.open_job_ids()):
            try:
                entry = JournalEntry.model_validate_json(read_private(self._path(job_id)))
            except (FileNotFoundError, ValidationError):  # gone, or a half-written file
                continue
            except UnsafeStatePath as exc:  # one bad entry must not stop the others
                log.error("skipping journal entry %s: %s", job_id, exc)
                continue
            if not entry.closed:
                yield entry

    def prune(self, older_than_seconds: float) -> int:
        """Delete closed entries older than `older_than_seconds`; returns how many."""
        now = time.time()
        pruned = 0
        with self._locked():
            for path in self._closed.glob("*.json"):
                pruned += _unlink_if_older(path, now - older_than_seconds)
            # Half-written entries of workers killed mid-write (a write takes ms).
            for path in [*self._dir.glob("*.tmp"), *self._closed.glob("*.tmp")]:
                _unlink_if_older(path, now - 60)
        return pruned

    def take_over_dead(self, owner: str) -> list[JournalEntry]:
        """Every open entry whose worker is gone, now owned by `owner`."""
        taken = []
        with self._locked():
            for entry in list(self._open_entries()):
                if entry.owner != owner and not self._alive(entry.owner):
                    mine = entry.model_copy(update={"owner": owner})
                    self.write(mine)
                    taken.append(mine)
        return taken


def _unlink_if_older(path: Path, cutoff: float) -> bool:
    try:
        if path.stat().st_mtime < cutoff:
            path.unlink()
            return True
    except FileNotFoundError:
        pass
    return False
