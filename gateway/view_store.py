"""The job view's SQLite file: one row per job, its history, and where in the log it is.

Synchronous and single-threaded: `sandfleet.gateway.job_view` runs every call on one
worker thread. Each batch of events is applied in one transaction together with the
log offset after it, so after a crash the view and its offset agree and a restart
resumes where the view stopped, applying no event twice.

Which events count is `job_rules.counts`, the same rule the gateway's job index follows,
so the view's owner of a job id is the index's.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandfleet.common.events import TERMINAL_PHASES, Event, Phase
from sandfleet.common.view_queries import MAX_HISTORY_ENTRIES, MAX_HISTORY_TEXT, ViewQuery
from sandfleet.gateway.job_rules import counts

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, phase TEXT NOT NULL, driver TEXT, host TEXT, worker_id TEXT,
    gpus TEXT NOT NULL DEFAULT '[]', exit_code INTEGER, submitted_by TEXT,
    labels TEXT NOT NULL DEFAULT '{}', submitted_at REAL NOT NULL, updated_at REAL NOT NULL,
    timings TEXT, accepted_event TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_submitted ON jobs (submitted_at);
CREATE INDEX IF NOT EXISTS jobs_by_updated ON jobs (updated_at);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL, phase TEXT NOT NULL,
    reason TEXT NOT NULL, message TEXT NOT NULL, host TEXT NOT NULL, worker_id TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_job ON history (job_id, seq);
CREATE TABLE IF NOT EXISTS position (
    id INTEGER PRIMARY KEY CHECK (id = 0), log TEXT NOT NULL, next_offset INTEGER NOT NULL
);
"""
_TERMINAL = tuple(phase.value for phase in TERMINAL_PHASES)
_PHASES = {phase.value: phase for phase in Phase}  # Phase(value), without its cost
JOB_COLUMNS = (
    "job_id, phase, driver, host, worker_id, gpus, exit_code, submitted_by, labels, "
    "submitted_at, updated_at, timings"
)

log = logging.getLogger(__name__)

# Stats count at most this many of the newest ended jobs.
MAX_STATS_JOBS = 100_000
CACHE_KIB = 16384  # the writer's page cache
WAL_CHECKPOINT_PAGES = 10_000  # WAL pages (4 KiB) written before a checkpoint (40 MiB)


@dataclass(frozen=True, slots=True)
class LoggedJob:
    """What the log says of a job id, as the gateway's job index asks it."""

    phase: Phase
    owner: str | None
    accepted_event: str | None  # the event_id of the `accepted` that took the id


@dataclass(frozen=True, slots=True)
class Ownership:
    """What the job index needs of a job at start-up."""

    job_id: str
    phase: Phase
    updated_at: float
    owner: str | None


def open_view_file(path: Path) -> sqlite3.Connection:
    """The view's database at `path` (made 0600, in a 0700 folder: it names who ran what)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    connection = sqlite3.connect(path, isolation_level=None)  # transactions by hand
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    # Events land on pages all over the history's event-id index (random ids): with
    # SQLite's default 2 MiB cache a batch spills and reads them again and again.
    connection.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    # A checkpoint copies each page the WAL holds once however often it was written:
    # the fewer checkpoints, the fewer copies of the pages every batch writes.
    connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    connection.executescript(_SCHEMA)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
    if "accepted_event" not in columns:  # a view file made before it was kept
        connection.execute("ALTER TABLE jobs ADD COLUMN accepted_event TEXT")
    return connection


class ViewLookups:
    """Point look-ups of job ids in the view file, on a read-only connection of the
    caller's thread (the job index's, on the event loop: a primary-key look-up takes
    microseconds, and WAL readers never wait on the view's writer)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA query_only = 1")

    def job(self, job_id: str) -> LoggedJob | None:
        row = self._db.execute(
            "SELECT phase, submitted_by, accepted_event FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        return None if row is None else LoggedJob(Phase(row[0]), row[1], row[2])

    def close(self) -> None:
        self._db.close()


class ViewStore:
    def __init__(self, connection: sqlite3.Connection, *, log: str) -> None:
        """`log` names the event log this view mirrors (broker, vhost): a view file made
        from another log is started afresh, as its offsets mean nothing here."""
        self._db = connection
        self._db.row_factory = sqlite3.Row
        self._writes = connection.cursor()  # the event writes' own: plain tuples, cheaper
        self._writes.row_factory = None
        row = self._db.execute("SELECT log FROM position WHERE id = 0").fetchone()
        if row is not None and row["log"] != log:
            self._db.executescript("DELETE FROM jobs; DELETE FROM history; DELETE FROM position;")
        self._log = log

    def next_offset(self) -> int | None:
        """The log offset to resume at; None: start from the log's beginning."""
        row = self._db.execute("SELECT next_offset FROM position WHERE id = 0").fetchone()
        return None if row is None else int(row["next_offset"])

    def ownerships(self) -> Iterator[Ownership]:
        """Every job, least recently updated first."""
        rows = self._db.execute(
            "SELECT job_id, phase, updated_at, submitted_by FROM jobs ORDER BY updated_at"
        )
        for row in rows:
            yield Ownership(row[0], Phase(row[1]), row[2], row[3])

    def apply(self, events: Sequence[Event], next_offset: int, *, horizon: float | None) -> int:
        """Apply `events` and record `next_offset`, in one transaction; forget ended jobs
        last updated before `horizon` (wall-clock seconds; None: none this time). How
        many events counted."""
        with self._transaction():
            try:
                applied = sum(self._apply_one(event) for event in events)
            except sqlite3.Error:
                raise  # the file itself: the whole batch rolls back and is tried again
            except Exception:
                # Some event would not apply: the batch again, each event on its own.
                self._db.execute("ROLLBACK")
                self._db.execute("BEGIN IMMEDIATE")
                applied = sum(self._apply_one_alone(event) for event in events)
            self._db.execute(
                "INSERT OR REPLACE INTO position (id, log, next_offset) VALUES (0, ?, ?)",
                (self._log, next_offset),
            )
            if horizon is not None:
                self._forget_before(horizon)
        return applied

    def _apply_one_alone(self, event: Event) -> int:
        """`_apply_one`, undone on its own if it fails: one bad event (a compromised
        worker's, say) must not take the batch's `accepted` events, and with them the
        ownership of other submitters' job ids, down with it. A savepoint per event costs
        as much as the event: only a batch that met a bad event is written so."""
        self._db.execute("SAVEPOINT one_event")
        try:
            applied = self._apply_one(event)
        except sqlite3.Error:
            raise
        except Exception:
            self._db.execute("ROLLBACK TO one_event")
            self._db.execute("RELEASE one_event")
            log.exception("job view: skipped event %s of job %s", event.event_id, event.job_id)
            return 0
        self._db.execute("RELEASE one_event")
        return applied

    def _apply_one(self, event: Event) -> int:
        assert event.job_id is not None
        # Whether the event is in the history already (a publisher that met a broker
        # outage sends the same event again, same id), and the job's phase: one query.
        seen, phase = self._writes.execute(
            "SELECT EXISTS (SELECT 1 FROM history WHERE event_id = ?),"
            " (SELECT phase FROM jobs WHERE job_id = ?)",
            (event.event_id, event.job_id),
        ).fetchone()
        if seen:
            return 0
        current = None if phase is None else _PHASES[phase]
        if not counts(current, event):
            return 0
        at = event.timestamp.timestamp()
        if current is None:
            self._insert(event, at)
        elif event.phase is Phase.ACCEPTED:
            self._reopen(event, at)
        else:
            self._update(event, at)
        self._writes.execute(
            "INSERT INTO history (event_id, job_id, phase, reason, message, host, worker_id,"
            " at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (event.event_id, event.job_id, event.phase.value, event.reason,
             event.message[:MAX_HISTORY_TEXT], event.host, event.worker_id, at),
        )  # fmt: skip
        return 1

    def _insert(self, event: Event, at: float) -> None:
        # Only an `accepted` event makes a row (job_rules.counts): it names the owner.
        self._writes.execute(
            "INSERT INTO jobs (job_id, phase, driver, submitted_by, labels, submitted_at,"
            " updated_at, accepted_event) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (event.job_id, event.phase.value, event.driver, event.submitted_by,
             _labels_json(event.labels), at, at, event.event_id),
        )  # fmt: skip

    def _reopen(self, event: Event, at: float) -> None:
        # An id whose last word was a rejection, taken again: a new run of the job. The
        # id stays its first submitter's (gateway.ownership), who alone may take it again.
        self._db.execute(
            "UPDATE jobs SET phase = ?, driver = ?, labels = ?, submitted_at = ?, updated_at = ?,"
            " accepted_event = ?, submitted_by = COALESCE(submitted_by, ?), host = NULL,"
            " worker_id = NULL, gpus = '[]', exit_code = NULL, timings = NULL WHERE job_id = ?",
            (event.phase.value, event.driver, _labels_json(event.labels), at, at,
             event.event_id, event.submitted_by, event.job_id),
        )  # fmt: skip

    def _update(self, event: Event, at: float) -> None:
        # A worker's event says where the job is; the gateway's own say nothing of that.
        worker = event.phase is not Phase.ACCEPTED and event.worker_id is not None
        self._writes.execute(
            "UPDATE jobs SET phase = ?, updated_at = ?,"
            " host = CASE WHEN ? THEN ? ELSE host END,"
            " worker_id = CASE WHEN ? THEN ? ELSE worker_id END,"
            " gpus = CASE WHEN ? THEN ? ELSE gpus END,"
            " exit_code = COALESCE(?, exit_code), timings = COALESCE(?, timings)"
            " WHERE job_id = ?",
            (event.phase.value, at, worker, event.host, worker, event.worker_id,
             bool(event.gpus), json.dumps(event.gpus) if event.gpus else "[]", event.exit_code,
             None if event.timings is None else json.dumps(event.timings), event.job_id),
        )  # fmt: skip

    def forget_ended(self, horizon: float) -> None:
        """Forget ended jobs last updated before `horizon`, in a transaction of its own."""
        with self._transaction():
            self._forget_before(horizon)

    def _forget_before(self, horizon: float) -> None:
        ended = f"phase IN ({', '.join('?' * len(_TERMINAL))}) AND updated_at < ?"
        self._db.execute(
            f"DELETE FROM history WHERE job_id IN (SELECT job_id FROM jobs WHERE {ended})",
            (*_TERMINAL, horizon),
        )
        self._db.execute(f"DELETE FROM jobs WHERE {ended}", (*_TERMINAL, horizon))

    def job(self, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """A job's row and its newest history entries (oldest first), or None."""
        row = self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        history = self._db.execute(
            "SELECT phase, reason, message, host, worker_id, at FROM history"
            " WHERE job_id = ? ORDER BY seq DESC LIMIT ?",
            (job_id, MAX_HISTORY_ENTRIES),
        ).fetchall()
        return dict(row), [dict(entry) for entry in reversed(history)]

    def jobs(self, query: ViewQuery, *, now: float) -> list[dict[str, Any]]:
        """The jobs `query` matches, newest submitted first, at most `query.limit`."""
        where, params = _job_filters(query, now=now, column="submitted_at")
        rows = self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs{where} ORDER BY submitted_at DESC LIMIT ?",
            (*params, query.limit),
        )
        return [dict(row) for row in rows]

    def ended_timings(self, query: ViewQuery, *, now: float) -> list[tuple[str, str, str]]:
        """(driver, host, timings JSON) of each ended job with timings `query` matches."""
        where, params = _job_filters(query, now=now, column="updated_at")
        where = f"{where} AND" if where else " WHERE"
        # The newest MAX_STATS_JOBS only: one question must not hold the view's one
        # thread (and every event write behind it) for a week of jobs.
        rows = self._db.execute(
            f"SELECT driver, host, timings FROM jobs{where} timings IS NOT NULL"
            " ORDER BY updated_at DESC LIMIT ?",
            [*params, MAX_STATS_JOBS],
        )
        return [(row[0] or "", row[1] or "", row[2]) for row in rows]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _labels_json(labels: dict[str, str] | None) -> str:
    return json.dumps(labels) if labels else "{}"


def _job_filters(query: ViewQuery, *, now: float, column: str) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for name, value in (
        ("phase", query.phase), ("driver", query.driver),
        ("host", query.host), ("submitted_by", query.submitted_by),
    ):  # fmt: skip
        if value is not None:
            clauses.append(f"{name} = ?")
            params.append(str(value))
    for key, value in query.labels.items():
        # json_each, not a JSON path built from the key: any key is safe as a parameter.
        clauses.append("EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE key = ? AND value = ?)")
        params += [key, value]
    if query.since_seconds is not None:
        clauses.append(f"{column} >= ?")
        params.append(now - query.since_seconds)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
