"""What `sandfleet top` shows, built from events alone: each worker's latest heartbeat,
and the jobs that have begun (accepted, waiting, claimed, starting, running) and not ended.

    view = FleetView()
    for event in events:        # heartbeats and job events, oldest first
        view.add(event)
    snapshot = view.snapshot(now)   # hosts, workers and jobs as rows

Pure: no I/O, no clock. `top_cli` feeds it from the event log and draws its snapshots.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sandfleet.common.events import Event, Phase, worker_state


@dataclass(frozen=True, kw_only=True)
class JobRow:
    """A job that has begun and not ended, as its latest event describes it."""

    job_id: str
    phase: str
    driver: str | None
    host: str | None  # None while no worker has taken it (the gateway's host is not its)
    worker_id: str | None
    gpus: list[str]
    submitted_by: str | None
    since: datetime  # its first event in the window read
    age_seconds: float


@dataclass(frozen=True, kw_only=True)
class WorkerRow:
    host: str
    driver: str | None
    worker_id: str
    state: str  # alive, stopped or lost (common.events.worker_state)
    slots: int
    slots_used: int
    slots_free: int
    jobs: int  # the jobs in the view that this worker holds
    last_seen_seconds: float


@dataclass(frozen=True, kw_only=True)
class HostRow:
    host: str
    workers_alive: int
    workers: int
    slots_used: int  # over its alive workers
    slots_free: int
    gpus: int  # the host's inventory, from its latest alive heartbeat
    gpus_free: int
    gpus_held: int
    jobs: int


@dataclass(frozen=True, kw_only=True)
class FleetSnapshot:
    at: datetime
    hosts: list[HostRow] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)
    jobs: list[JobRow] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The snapshot as `top --json` prints it: datetimes in ISO 8601."""
        document = asdict(self)
        document["at"] = self.at.isoformat()
        for job in document["jobs"]:
            job["since"] = job["since"].isoformat()
        return document


# Ended job ids remembered, as the event stream remembers event ids: far more than
# the events of ended jobs still arriving late.
_ENDED_REMEMBERED = 100_000


@dataclass
class _Job:
    first: Event
    latest: Event


class FleetView:
    """Heartbeats and job events in; a snapshot of the fleet out."""

    def __init__(self, *, window: timedelta = timedelta(minutes=10)) -> None:
        # A worker last heard of longer ago than `window` drops out of the snapshot, as
        # it would from a fresh `top --since`: a view left open for days stays current.
        self._window = window
        self._beats: dict[str, Event] = {}  # worker id → its latest heartbeat
        self._jobs: dict[str, _Job] = {}
        # Jobs seen to end: an event of theirs read later (a taken-over job's repeated
        # `running`) must not bring them back. Only a new `accepted` does (an id
        # rejected, then submitted again). The oldest are forgotten past a bound.
        self._ended: OrderedDict[str, None] = OrderedDict()

    def add(self, event: Event) -> None:
        if event.phase is Phase.HEARTBEAT:
            self._add_heartbeat(event)
        elif event.job_id is not None:
            self._add_job_event(event.job_id, event)

    def _add_heartbeat(self, beat: Event) -> None:
        key = beat.worker_id or beat.host
        known = self._beats.get(key)
        if known is None or known.timestamp <= beat.timestamp:
            self._beats[key] = beat

    def _add_job_event(self, job_id: str, event: Event) -> None:
        if event.phase.is_terminal:
            self._jobs.pop(job_id, None)
            self._remember_ended(job_id)
            return
        if event.phase is Phase.ACCEPTED:
            self._ended.pop(job_id, None)
            self._jobs[job_id] = _Job(first=event, latest=event)
        elif job_id not in self._ended:
            job = self._jobs.setdefault(job_id, _Job(first=event, latest=event))
            job.latest = event

    def _remember_ended(self, job_id: str) -> None:
        self._ended[job_id] = None
        self._ended.move_to_end(job_id)
        if len(self._ended) > _ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def snapshot(self, now: datetime) -> FleetSnapshot:
        beats = [beat for beat in self._beats.values() if beat.timestamp >= now - self._window]
        jobs = sorted(
            (_job_row(job_id, job, now) for job_id, job in self._jobs.items()),
            key=lambda row: (row.since, row.job_id),
        )
        workers = sorted(
            (_worker_row(beat, jobs, now) for beat in beats),
            key=lambda row: (row.host, row.driver or "", row.worker_id),
        )
        return FleetSnapshot(
            at=now,
            hosts=_host_rows(beats, workers, jobs),
            workers=workers,
            jobs=jobs,
        )


def _job_row(job_id: str, job: _Job, now: datetime) -> JobRow:
    latest = job.latest
    taken = latest.worker_id is not None  # a worker's event: the host is where it runs
    return JobRow(
        job_id=job_id,
        phase=latest.phase.value,
        driver=latest.driver or job.first.driver,
        host=latest.host if taken else None,
        worker_id=latest.worker_id,
        gpus=list(latest.gpus),
        submitted_by=job.first.submitted_by or latest.submitted_by,
        since=job.first.timestamp,
        age_seconds=max(0.0, (now - job.first.timestamp).total_seconds()),
    )


def _worker_row(beat: Event, jobs: list[JobRow], now: datetime) -> WorkerRow:
    health = beat.health
    slots = health.slots if health else 0
    worker_id = beat.worker_id or "-"
    held = sum(1 for job in jobs if job.worker_id == worker_id)
    # A heartbeat is up to a period old; the jobs the worker has taken since then hold
    # slots too, so the busier of the two counts (never more than the worker has).
    used = min(slots, max(slots - health.free_slots if health else 0, held))
    return WorkerRow(
        host=beat.host,
        driver=beat.driver,
        worker_id=worker_id,
        state=worker_state(beat, now),
        slots=slots,
        slots_used=used,
        slots_free=slots - used,
        jobs=held,
        last_seen_seconds=max(0.0, (now - beat.timestamp).total_seconds()),
    )


def _host_rows(
    beats: Iterable[Event], workers: list[WorkerRow], jobs: list[JobRow]
) -> list[HostRow]:
    alive_beats: dict[str, Event] = {}  # host → its latest heartbeat from an alive worker
    alive_ids = {row.worker_id for row in workers if row.state == "alive"}
    for beat in beats:
        known = alive_beats.get(beat.host)
        if (beat.worker_id or "-") in alive_ids and (
            known is None or known.timestamp < beat.timestamp
        ):
            alive_beats[beat.host] = beat
    hosts = sorted({row.host for row in workers} | {job.host for job in jobs if job.host})
    return [_host_row(host, alive_beats.get(host), workers, jobs) for host in hosts]


def _host_row(
    host: str, beat: Event | None, workers: list[WorkerRow], jobs: list[JobRow]
) -> HostRow:
    # GPUs belong to the host, not to a worker: every worker on it reports the same
    # inventory and free count (their claims are shared), so one heartbeat says it.
    gpus = len(beat.health.gpus) if beat and beat.health else 0
    gpus_free = beat.health.gpus_free if beat and beat.health else 0
    alive = [row for row in workers if row.host == host and row.state == "alive"]
    return HostRow(
        host=host,
        workers_alive=len(alive),
        workers=sum(1 for row in workers if row.host == host),
        slots_used=sum(row.slots_used for row in alive),
        slots_free=sum(row.slots_free for row in alive),
        gpus=gpus,
        gpus_free=gpus_free,
        gpus_held=gpus - gpus_free,
        jobs=sum(1 for job in jobs if job.host == host),
    )
