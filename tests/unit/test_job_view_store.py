"""The job view's SQLite store, alone: which events count (the job index's rules), what a
job row holds, filters, forgetting by age, and the file's permissions."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandfleet.common.events import Event, Phase
from sandfleet.common.view_queries import (
    JobSummary,
    ViewQuery,
    ViewReply,
    ViewStatus,
    label_filters,
    parse_query,
    since_seconds,
)
from sandfleet.gateway.service import mirrored_log
from sandfleet.gateway.view_desk import bounded_reply
from sandfleet.gateway.view_stats import fleet_stats, percentile
from sandfleet.gateway.view_store import ViewStore, open_view_file

NOW = 1_800_000_000.0
LOG = "amqp://guest:***@broker/v sandfleet.events.log"


def event(phase: Phase, job_id: str = "j1", *, at: float = NOW, **fields: Any) -> Event:
    values: dict[str, Any] = {"host": "gw", "driver": "docker", **fields}
    return Event(job_id=job_id, phase=phase, timestamp=datetime.fromtimestamp(at, UTC), **values)


@pytest.fixture
def store(tmp_path: Path) -> ViewStore:
    return ViewStore(open_view_file(tmp_path / "state" / "view.sqlite3"), log=LOG)


def test_the_view_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "view.sqlite3"
    open_view_file(path).close()
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)


def test_only_an_accepted_event_makes_a_job_and_names_its_owner(store: ViewStore) -> None:
    applied = store.apply(
        [
            event(Phase.RUNNING, "stray", host="w1", worker_id="w1-1"),  # never accepted
            event(Phase.REJECTED, "bad", submitted_by="mallory"),  # takes no id
            event(Phase.ACCEPTED, submitted_by="alice", labels={"team": "a"}),
            event(Phase.RUNNING, host="w1", worker_id="w1-1", gpus=["0"], submitted_by="bob"),
            event(
                Phase.SUCCEEDED, host="w1", worker_id="w1-1", exit_code=0, timings={"queued": 1.5}
            ),
            event(Phase.ACCEPTED, submitted_by="bob"),  # late: does not reopen the job
        ],
        7,
        horizon=0,
    )
    assert applied == 3
    found = store.job("j1")
    assert found is not None
    row, history = found
    assert (row["phase"], row["submitted_by"], row["host"], row["worker_id"]) == (
        "succeeded", "alice", "w1", "w1-1",
    )  # fmt: skip
    assert (json.loads(row["gpus"]), row["exit_code"], json.loads(row["labels"])) == (
        ["0"], 0, {"team": "a"},
    )  # fmt: skip
    assert json.loads(row["timings"]) == {"queued": 1.5}
    assert [entry["phase"] for entry in history] == ["accepted", "running", "succeeded"]
    assert store.job("stray") is None and store.job("bad") is None
    assert store.next_offset() == 7
    assert [(o.job_id, o.owner) for o in store.ownerships()] == [("j1", "alice")]


def test_ended_jobs_older_than_the_horizon_are_forgotten_live_ones_kept(store: ViewStore) -> None:
    store.apply(
        [event(Phase.ACCEPTED, "old-ended", at=NOW - 100),
         event(Phase.FAILED, "old-ended", at=NOW - 100),
         event(Phase.ACCEPTED, "old-live", at=NOW - 100), event(Phase.ACCEPTED, "new", at=NOW)],
        4, horizon=NOW - 50,
    )  # fmt: skip
    assert [o.job_id for o in store.ownerships()] == ["old-live", "new"]


def test_a_view_of_another_log_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "view.sqlite3"
    ViewStore(open_view_file(path), log=LOG).apply([event(Phase.ACCEPTED)], 3, horizon=0)
    again = ViewStore(open_view_file(path), log=LOG)
    assert again.next_offset() == 3
    other = ViewStore(open_view_file(path), log="amqp://elsewhere/ sandfleet.events.log")
    assert other.next_offset() is None and list(other.ownerships()) == []


def test_a_failed_batch_leaves_neither_rows_nor_offset(
    store: ViewStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = event(Phase.ACCEPTED, "b")
    apply_one = store._apply_one

    def disk_full(one: Event) -> int:
        if one.event_id == broken.event_id:
            raise sqlite3.OperationalError("database or disk is full")
        return apply_one(one)

    monkeypatch.setattr(store, "_apply_one", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        store.apply([event(Phase.ACCEPTED, "a"), broken], 9, horizon=0)
    assert store.next_offset() is None and store.job("a") is None


def test_jobs_filter_on_labels_safely_and_list_newest_first(store: ViewStore) -> None:
    odd = 'it\'s "$.x"'  # a key that would break a JSON path built from it
    store.apply(
        [event(Phase.ACCEPTED, "a", at=NOW - 10, labels={odd: "1", "team": "x"}),
         event(Phase.ACCEPTED, "b", at=NOW - 5, labels={odd: "1"}),
         event(Phase.ACCEPTED, "c", at=NOW, driver="vm", submitted_by="carol")],
        3, horizon=0,
    )  # fmt: skip

    def ids(**filters: Any) -> list[str]:
        return [row["job_id"] for row in store.jobs(ViewQuery(kind="jobs", **filters), now=NOW)]

    assert ids() == ["c", "b", "a"]
    assert ids(labels={odd: "1"}) == ["b", "a"]
    assert ids(labels={odd: "1", "team": "x"}) == ["a"]
    assert ids(driver="vm") == ids(submitted_by="carol") == ["c"]
    assert ids(since_seconds=7) == ["c", "b"]
    assert ids(limit=1) == ["c"]


def test_queries_are_validated_with_field_paths() -> None:
    status = parse_query(b'{"kind": "status"}')
    assert isinstance(status, list) and status[0].field == "query.job_id"
    limit = parse_query(b'{"kind": "jobs", "limit": 100000}')
    assert isinstance(limit, list) and limit[0].field == "query.limit"
    extra = parse_query(b'{"kind": "jobs", "sql": "drop"}')
    assert isinstance(extra, list) and extra[0].field == "query.sql"
    huge = parse_query(b" " * 20000)
    assert isinstance(huge, list) and huge[0].field == "query"
    assert isinstance(parse_query(b'{"kind": "jobs", "since_seconds": 3600}'), ViewQuery)


def test_since_and_label_flags() -> None:
    assert [since_seconds(t) for t in ("30s", "15m", "1h", "2d", "1w", "90")] == [
        30, 900, 3600, 172800, 604800, 90,
    ]  # fmt: skip
    for bad in ("", "1y", "-1h", "0s", "400d"):
        with pytest.raises(ValueError):
            since_seconds(bad)
    assert label_filters(["a=b", "c=d=e", "f="]) == {"a": "b", "c": "d=e", "f": ""}
    with pytest.raises(ValueError, match="key=value"):
        label_filters(["novalue"])


def test_stats_skip_unknown_stages_and_bad_values() -> None:
    rows = [("docker", "h1", json.dumps({"queued": 2.0, "bogus": 1.0, "running": -1})),
            ("docker", "h1", json.dumps({"queued": 4.0, "running": True})),
            ("vm", "h2", "[]")]  # fmt: skip
    stats = fleet_stats(rows)
    assert stats.jobs == 3 and list(stats.stages) == ["queued"]
    assert (stats.stages["queued"].p50, stats.stages["queued"].p99) == (2.0, 4.0)
    assert list(stats.by_host) == ["h1"]  # h2's job had no timings to count


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=200), st.floats(0.01, 1.0))
def test_a_percentile_is_a_sample_with_enough_samples_at_or_below_it(
    values: list[float], fraction: float
) -> None:
    ordered = sorted(values)
    value = percentile(ordered, fraction)
    assert value in ordered
    assert sum(v <= value for v in ordered) >= fraction * len(ordered)
    assert sum(v < value for v in ordered) < fraction * len(ordered)


def test_a_reply_too_big_keeps_the_newest_jobs_and_says_so() -> None:
    at = datetime.fromtimestamp(NOW, UTC)
    jobs = [JobSummary(job_id=f"j{n}", phase=Phase.RUNNING, labels={"k": "v" * 200},
                       submitted_at=at, updated_at=at) for n in range(100)]  # fmt: skip
    reply = bounded_reply(ViewReply(status=ViewStatus.OK, gateway="g", jobs=jobs), max_bytes=5000)
    assert reply.truncated and reply.jobs and reply.jobs[0].job_id == "j0"
    assert len(reply.model_dump_json(exclude_none=True)) <= 5000


def test_sqlite_has_json_each() -> None:
    # The label filter needs SQLite's JSON functions (built in since 3.38, usual before).
    assert sqlite3.connect(":memory:").execute("SELECT count(*) FROM json_each('[1]')").fetchone()


def test_a_view_mirrors_a_broker_address_and_vhost_whoever_logs_in() -> None:
    mine = mirrored_log("amqp://gw:old-pw@rabbit:5672/fleet")
    assert mirrored_log("amqp://gw2:new-pw@rabbit:5672/fleet") == mine
    assert mirrored_log("amqp://gw:old-pw@rabbit:5672/other") != mine
    assert "old-pw" not in mine


def test_an_event_published_twice_counts_once(store: ViewStore) -> None:
    running = event(Phase.RUNNING, host="w1", worker_id="w1-1")
    applied = store.apply([event(Phase.ACCEPTED), running, running], 3, horizon=0)
    found = store.job("j1")
    assert applied == 2 and found is not None
    assert [entry["phase"] for entry in found[1]] == ["accepted", "running"]


def test_one_event_that_fails_to_apply_does_not_take_the_batch_with_it(
    store: ViewStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: any non-SQLite error lost the whole batch (other submitters' `accepted`
    events and so their ownership) while the offset moved past it."""
    poison = event(Phase.RUNNING, "a", host="w1")
    apply_one = store._apply_one

    def failing(one: Event) -> int:
        if one.event_id == poison.event_id:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return apply_one(one)

    monkeypatch.setattr(store, "_apply_one", failing)
    batch = [event(Phase.ACCEPTED, "a", submitted_by="alice"), poison]
    batch += [event(Phase.ACCEPTED, "b", submitted_by="bob")]
    assert store.apply(batch, 42, horizon=0) == 2
    assert {o.job_id: o.owner for o in store.ownerships()} == {"a": "alice", "b": "bob"}
    # Written once each, though the batch was tried whole before it was tried event by
    # event; and its offset with it.
    for job_id in "ab":
        found = store.job(job_id)
        assert found is not None and [entry["phase"] for entry in found[1]] == ["accepted"]
    assert store.next_offset() == 42


def test_a_forged_giant_exit_code_is_no_event() -> None:
    with pytest.raises(ValueError, match="exit_code"):
        event(Phase.SUCCEEDED, exit_code=2**64)
