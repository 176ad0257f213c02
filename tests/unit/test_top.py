"""`sandfleet top`'s model: events in, rows of hosts, workers and jobs out."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from sandfleet.common.events import HEARTBEAT_STOPPED, Event, Phase, WorkerHealth
from sandfleet.gateway import top
from sandfleet.gateway.top import FleetView
from sandfleet.gateway.top_render import duration, top_frame

T0 = datetime(2026, 1, 2, 3, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def beat(
    worker: str,
    host: str,
    seconds: float,
    *,
    free: int = 2,
    slots: int = 2,
    gpus: int = 0,
    gpus_free: int = 0,
    reason: str = "Alive",
) -> Event:
    health = WorkerHealth(
        slots=slots,
        free_slots=free,
        started_at=T0,
        heartbeat_seconds=10.0,
        gpus=[{"index": i} for i in range(gpus)],
        gpus_free=gpus_free,
    )
    return Event(
        job_id=None, phase=Phase.HEARTBEAT, reason=reason, driver="docker", host=host,
        worker_id=worker, health=health, timestamp=at(seconds),
    )  # fmt: skip


def accepted(job: str, seconds: float) -> Event:
    return Event(
        job_id=job, phase=Phase.ACCEPTED, driver="docker", host="gateway-host",
        submitted_by="alice", timestamp=at(seconds),
    )  # fmt: skip


def on_worker(job: str, phase: Phase, seconds: float, *, worker: str = "w1") -> Event:
    return Event(
        job_id=job, phase=phase, driver="docker", host="gpu-01", worker_id=worker,
        gpus=["nvidia.com/gpu=0"], timestamp=at(seconds),
    )  # fmt: skip


def view_of(*events: Event) -> FleetView:
    view = FleetView()
    for event in events:
        view.add(event)
    return view


def test_a_running_job_shows_where_it_runs_and_since_when() -> None:
    view = view_of(
        beat("w1", "gpu-01", 60, free=1, gpus=2, gpus_free=1),
        accepted("j1", 1),
        on_worker("j1", Phase.STARTING, 2),
        on_worker("j1", Phase.RUNNING, 3),
    )
    shot = view.snapshot(at(61))
    [job] = shot.jobs
    assert (job.job_id, job.phase, job.host, job.worker_id, job.driver) == (
        "j1", "running", "gpu-01", "w1", "docker",
    )  # fmt: skip
    assert (job.gpus, job.submitted_by, job.since, job.age_seconds) == (
        ["nvidia.com/gpu=0"], "alice", at(1), 60.0,
    )  # fmt: skip
    [worker] = shot.workers
    assert (worker.state, worker.slots_used, worker.slots_free, worker.jobs) == ("alive", 1, 1, 1)
    [host] = shot.hosts
    assert (host.host, host.workers_alive, host.workers, host.jobs) == ("gpu-01", 1, 1, 1)
    assert (host.slots_used, host.slots_free, host.gpus, host.gpus_free, host.gpus_held) == (
        1, 1, 2, 1, 1,
    )  # fmt: skip


def test_a_queued_job_has_no_host_yet() -> None:
    [job] = view_of(accepted("j1", 0)).snapshot(at(5)).jobs
    assert (job.phase, job.host, job.worker_id) == ("accepted", None, None)


def test_ended_jobs_leave_and_late_events_do_not_bring_them_back() -> None:
    view = view_of(
        accepted("j1", 0),
        on_worker("j1", Phase.RUNNING, 1),
        on_worker("j1", Phase.SUCCEEDED, 2),
        # A worker that took over the job repeats an earlier step after its end.
        on_worker("j1", Phase.RUNNING, 3, worker="w2"),
    )
    assert view.snapshot(at(4)).jobs == []


def test_an_id_rejected_then_accepted_again_is_shown_anew() -> None:
    view = view_of(
        accepted("j1", 0),
        on_worker("j1", Phase.REJECTED, 1),
        accepted("j1", 5),
    )
    [job] = view.snapshot(at(6)).jobs
    assert (job.phase, job.since) == ("accepted", at(5))


def test_a_job_begun_before_the_window_is_seen_from_its_first_event_read() -> None:
    [job] = view_of(on_worker("j1", Phase.RUNNING, 10)).snapshot(at(12)).jobs
    assert (job.phase, job.since, job.submitted_by) == ("running", at(10), None)


def test_workers_keep_their_latest_beat_and_are_stopped_or_lost() -> None:
    view = view_of(
        beat("w1", "h1", 100, free=0),
        beat("w1", "h1", 90, free=2),  # older, read after: ignored
        beat("w2", "h1", 100, reason=HEARTBEAT_STOPPED),
        beat("w3", "h2", 0),  # silent for 3+ periods of 10 s
    )
    shot = view.snapshot(at(101))
    assert [(w.worker_id, w.state, w.slots_free) for w in shot.workers] == [
        ("w1", "alive", 0), ("w2", "stopped", 2), ("w3", "lost", 2),
    ]  # fmt: skip
    h1, h2 = shot.hosts
    # Only alive workers' slots count: a stopped or lost worker's slots are not there.
    assert (h1.host, h1.workers_alive, h1.workers, h1.slots_used, h1.slots_free) == (
        "h1", 1, 2, 2, 0,
    )  # fmt: skip
    assert (h2.host, h2.workers_alive, h2.slots_free, h2.gpus) == ("h2", 0, 0, 0)


def test_the_json_snapshot_is_plain_json() -> None:
    view = view_of(beat("w1", "gpu-01", 0), accepted("j1", 1), on_worker("j1", Phase.RUNNING, 2))
    document = json.loads(json.dumps(view.snapshot(at(3)).as_json()))
    assert document["at"] == at(3).isoformat()
    assert document["jobs"][0]["since"] == at(1).isoformat()
    assert document["workers"][0]["worker_id"] == "w1"
    assert document["hosts"][0]["host"] == "gpu-01"


def test_the_frame_prints_event_text_as_itself() -> None:
    view = view_of(beat("[/bold]", "[red]h", 0), accepted("j[/x]", 1))
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(top_frame(view.snapshot(at(2))))
    text = buffer.getvalue()
    assert "[/bold]" in text and "[red]h" in text and "j[/x]" in text
    assert "(queued)" in text


def test_durations_are_short() -> None:
    assert [duration(s) for s in (0, 59.9, 60, 187, 3600, 7500)] == [
        "0s", "59s", "1m00s", "3m07s", "1h00m", "2h05m",
    ]  # fmt: skip


_JOB_PHASES = [p for p in Phase if p is not Phase.HEARTBEAT]


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(_JOB_PHASES)), max_size=30)
)
def test_the_jobs_shown_are_those_whose_last_event_is_not_terminal(
    steps: list[tuple[str, Phase]],
) -> None:
    """Against an oracle: a job is shown iff its last event is not terminal, unless it
    ended earlier and no `accepted` has come since."""
    view, expected, ended = FleetView(), set[str](), set[str]()
    for index, (job, phase) in enumerate(steps):
        view.add(on_worker(job, phase, index))
        if phase.is_terminal:
            expected.discard(job)
            ended.add(job)
        elif phase is Phase.ACCEPTED or job not in ended:
            ended.discard(job)
            expected.add(job)
    shown = view.snapshot(at(len(steps))).jobs
    assert {row.job_id for row in shown} == expected
    assert all(row.age_seconds >= 0 for row in shown)


def test_slots_taken_since_the_last_heartbeat_count_as_used() -> None:
    view = view_of(
        beat("w1", "gpu-01", 0, free=2, slots=2),  # sent before the job was taken
        accepted("j1", 1),
        on_worker("j1", Phase.RUNNING, 2),
    )
    [worker] = view.snapshot(at(3)).workers
    assert (worker.slots_used, worker.slots_free, worker.jobs) == (1, 1, 1)
    [host] = view.snapshot(at(3)).hosts
    assert (host.slots_used, host.slots_free) == (1, 1)


def test_used_slots_never_exceed_the_workers_slots() -> None:
    events = [beat("w1", "gpu-01", 0, free=1, slots=1)]
    events += [on_worker(f"j{i}", Phase.RUNNING, 1) for i in range(3)]
    [worker] = view_of(*events).snapshot(at(2)).workers
    assert (worker.slots_used, worker.slots_free, worker.jobs) == (1, 0, 3)


def test_workers_silent_for_longer_than_the_window_drop_out() -> None:
    view = FleetView(window=timedelta(minutes=10))
    for event in (beat("old", "h1", 0), beat("new", "h2", 500)):
        view.add(event)
    shot = view.snapshot(at(601))
    assert [w.worker_id for w in shot.workers] == ["new"]
    assert [h.host for h in shot.hosts] == ["h2"]


def test_only_the_latest_ended_jobs_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(top, "_ENDED_REMEMBERED", 2)
    view = view_of(*(on_worker(job, Phase.SUCCEEDED, 0) for job in ("a", "b", "c")))
    for job in ("a", "b", "c"):
        view.add(on_worker(job, Phase.RUNNING, 1))
    # "a" was forgotten, so its late event shows it again: the bound is a trade-off.
    assert [row.job_id for row in view.snapshot(at(2)).jobs] == ["a"]
