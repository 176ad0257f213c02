"""The gateway's materialised view of the fleet's jobs, kept from the event log in SQLite.

Each gateway keeps its own view file (SANDFLEET_VIEW_PATH). The job index hands it every
message it reads from the log together with the offset after it; the view writes them in
batches, each in one transaction with that offset (sandfleet.gateway.view_store), so a
restarted gateway resumes reading the log where its view stopped instead of replaying it.
A message the view has no use for (a heartbeat) only moves the offset: that is written
with the next batch, or OFFSET_WRITE_SECONDS later, never a transaction per message.

Batches are gathered for FLUSH_SECONDS (or until FLUSH_EVENTS wait) before they are
written: a transaction's own cost (its commit, the offset) is then shared by many events
instead of the few a live gateway reads between two writes. Nothing waits on that: the
job index answers from what it read until the view says it is written, and `flushed()`
writes at once. Ended jobs past the log's age are forgotten every FORGET_EVERY_SECONDS,
not in every batch.

All writes and queries run on one thread of its own: the event loop never waits on
them, and that connection is only ever used by the thread that made it. The job index's
point look-ups of single job ids (`lookup`) read the file on a connection of the event
loop's own: microseconds each, and never blocked by a write (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

from sandfleet.common.events import Event, Phase
from sandfleet.common.view_queries import (
    HistoryEntry,
    JobDetail,
    JobSummary,
    ViewQuery,
    ViewReply,
    ViewStatus,
)
from sandfleet.gateway.view_stats import fleet_stats
from sandfleet.gateway.view_store import LoggedJob, ViewLookups, ViewStore, open_view_file

T = TypeVar("T")
log = logging.getLogger(__name__)

# How long a log offset moved only by messages the view skips waits to be written: a
# restart reads those messages again (cheaply: skipped on their routing key).
OFFSET_WRITE_SECONDS = 2.0
# How long recorded events wait to be written with those that follow, unless FLUSH_EVENTS
# wait already; at 600 events/s a transaction holds some 60 of them.
FLUSH_SECONDS = 0.1
FLUSH_EVENTS = 1000
# How often a batch also forgets the ended jobs older than the log keeps (two DELETEs
# that cost as much as a small batch's events).
FORGET_EVERY_SECONDS = 10.0

Written = Callable[[int], None]  # called with the offset each written batch ends at


class JobView:
    def __init__(self, path: Path, *, log: str, max_age_seconds: float, host: str) -> None:
        """`log` names the event log mirrored (see ViewStore); `host`, this gateway's."""
        self._path = path
        self._log = log
        self._max_age_seconds = max_age_seconds
        self._host = host
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-view")
        self._store: ViewStore | None = None
        self._lookups: ViewLookups | None = None
        self._pending: list[Event] = []
        self._pending_offset: int | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._forgotten_at: float | None = None  # monotonic(); None: not since start
        self._forgetting: asyncio.Task[None] | None = None
        self._written_offset: int | None = None
        self.written: Written | None = None
        self.applied = 0  # events that changed the view since this gateway started
        self.batches = 0  # transactions written since this gateway started

    async def open(self) -> None:
        self._store = await self._run(lambda: ViewStore(open_view_file(self._path), log=self._log))
        self._lookups = ViewLookups(self._path)
        self._forgetting = asyncio.create_task(self._forget_while_quiet())

    async def _forget_while_quiet(self) -> None:
        """Forget ended jobs past the log's age on a log with no events to write for a
        while (batches forget them otherwise): their ids are free to submit again."""
        while True:
            await asyncio.sleep(FORGET_EVERY_SECONDS)  # a pace, not a wait on an event
            horizon = self._forget_horizon()
            if horizon is None or self._is_flushing():
                continue
            started = monotonic()
            try:
                await self._run(functools.partial(self._open_store().forget_ended, horizon))
            except sqlite3.Error:
                log.exception("job view: ended jobs not forgotten; tried again later")
                continue
            self._forgotten_at = started

    async def next_offset(self) -> int | None:
        """Where in the log to resume (None: from its beginning)."""
        return await self._run(lambda: self._open_store().next_offset())

    @property
    def backlog(self) -> int:
        """Events recorded, not yet written."""
        return len(self._pending)

    def lookup(self, job_id: str) -> LoggedJob | None:
        """What the view file holds of `job_id` (not what is recorded but unwritten)."""
        if self._lookups is None:
            raise RuntimeError("the job view is not open")
        return self._lookups.job(job_id)

    def record(self, events: Iterable[Event], next_offset: int) -> None:
        """Queue the `events` of a message read before `next_offset` (none: a message that
        is no event). All in one step: a flush never writes the offset past a message
        while leaving some of its events behind."""
        self._pending.extend(
            event
            for event in events
            if event.job_id is not None and event.phase is not Phase.HEARTBEAT
        )
        self._pending_offset = next_offset
        if len(self._pending) >= FLUSH_EVENTS:
            self._start_flush()
        elif not self._is_flushing():  # else the flush running sees to what it leaves
            self._flush_later()

    def skip(self, next_offset: int) -> None:
        """Move the offset past a message the view has no use for."""
        self.record((), next_offset)

    async def flushed(self) -> None:
        """Return once everything recorded so far (the offset too) is written, or a
        write of it failed (and is kept to retry)."""
        target = self._pending_offset
        while True:
            before = self._written_offset
            if not self._is_flushing():
                if target is None or self._written(target):
                    return
                self._start_flush()
            assert self._flushing is not None
            await asyncio.shield(self._flushing)
            if target is None or self._written(target) or self._written_offset == before:
                return  # all written, or a pass failed (what it held is kept to retry)

    def _written(self, offset: int) -> bool:
        return self._written_offset is not None and self._written_offset >= offset

    def _is_flushing(self) -> bool:
        return self._flushing is not None and not self._flushing.done()

    def _flush_later(self) -> None:
        """A flush when what is recorded is due: events FLUSH_SECONDS from now, a moved
        offset alone OFFSET_WRITE_SECONDS."""
        self._flush_within(FLUSH_SECONDS if self._pending else OFFSET_WRITE_SECONDS)

    def _flush_within(self, seconds: float) -> None:
        """Start a flush `seconds` from now, unless one is due sooner already."""
        loop = asyncio.get_running_loop()
        if self._flush_timer is not None:
            if self._flush_timer.when() <= loop.time() + seconds:
                return
            self._flush_timer.cancel()
        self._flush_timer = loop.call_later(seconds, self._start_flush)

    def _start_flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._is_flushing():
            self._flushing = asyncio.create_task(self._flush())

    def _forget_horizon(self) -> float | None:
        """What a batch written now forgets ended jobs last updated before (wall clock);
        None: nothing, they were looked for lately."""
        if self._forgotten_at is not None and monotonic() - self._forgotten_at < (
            FORGET_EVERY_SECONDS
        ):
            return None
        return time.time() - self._max_age_seconds

    async def _flush(self) -> None:
        # One batch per pass: whatever arrived while the previous batch was written. A
        # remainder under FLUSH_EVENTS waits to be joined by more (FLUSH_SECONDS), one of
        # skipped messages alone for the offset timer; `flushed()` starts it sooner.
        while self._pending_offset is not None:
            events, offset = self._pending, self._pending_offset
            self._pending, self._pending_offset = [], None
            horizon, started = self._forget_horizon(), monotonic()
            apply = functools.partial(self._open_store().apply, events, offset, horizon=horizon)
            try:
                self.applied += await self._run(apply)
            except sqlite3.Error:
                # The batch rolled back: keep it, ahead of what came since, for the next
                # pass (the next event read), rather than skip it for good.
                log.exception("job view: %d events not written; kept to retry", len(events))
                self._pending = events + self._pending
                if self._pending_offset is None:
                    self._pending_offset = offset
                # Tried again soon, whether or not more events come (a quiet log).
                self._flush_within(OFFSET_WRITE_SECONDS)
                return
            self.batches += 1
            if horizon is not None:
                self._forgotten_at = started
            self._written_offset = offset
            if self.written is not None:
                self.written(offset)
            if len(self._pending) < FLUSH_EVENTS:
                break
        if self._pending_offset is not None:
            self._flush_later()

    async def answer(self, query: ViewQuery) -> ViewReply:
        store, now = self._open_store(), time.time()
        if query.kind == "status":
            assert query.job_id is not None
            found = await self._run(lambda: store.job(query.job_id or ""))
            if found is None:
                return ViewReply(status=ViewStatus.NOT_FOUND, gateway=self._host)
            return ViewReply(status=ViewStatus.OK, gateway=self._host, job=_detail(*found))
        if query.kind == "jobs":
            rows = await self._run(lambda: store.jobs(query, now=now))
            jobs = [JobSummary.model_validate(_summary_fields(row)) for row in rows]
            return ViewReply(status=ViewStatus.OK, gateway=self._host, jobs=jobs)
        timings = await self._run(lambda: store.ended_timings(query, now=now))
        return ViewReply(status=ViewStatus.OK, gateway=self._host, stats=fleet_stats(timings))

    async def aclose(self) -> None:
        if self._forgetting is not None:
            self._forgetting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forgetting
            self._forgetting = None
        await self.flushed()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self._lookups is not None:
            self._lookups.close()
            self._lookups = None
        self._thread.shutdown(wait=True)

    def _open_store(self) -> ViewStore:
        if self._store is None:
            raise RuntimeError("the job view is not open")
        return self._store

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)


def _summary_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "gpus": json.loads(row["gpus"]),
        "labels": json.loads(row["labels"]),
        "timings": None if row["timings"] is None else json.loads(row["timings"]),
        "submitted_at": datetime.fromtimestamp(row["submitted_at"], UTC),
        "updated_at": datetime.fromtimestamp(row["updated_at"], UTC),
    }


def _detail(row: dict[str, Any], history: list[dict[str, Any]]) -> JobDetail:
    entries = [
        HistoryEntry(
            phase=entry["phase"],
            reason=entry["reason"],
            message=entry["message"],
            host=entry["host"],
            worker_id=entry["worker_id"],
            timestamp=datetime.fromtimestamp(entry["at"], UTC),
        )
        for entry in history
    ]
    return JobDetail.model_validate({**_summary_fields(row), "events": entries})
