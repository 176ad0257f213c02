"""The gateway's job view against a real broker: `status`, `jobs` and `stats` answered
from it, filtered; and a restarted gateway resumes its view instead of replaying the log."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sandfleet.common.amqp import connect
from sandfleet.common.event_publisher import EventPublisher
from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.common.topology import existing_topology
from sandfleet.common.view_queries import ViewQuery, ViewStatus
from sandfleet.gateway.client import Client
from sandfleet.gateway.service import Gateway
from tests.support import eventually
from tests.support.cli import run_sandfleet, sandfleet_env
from tests.support.runtimes import registered_driver, worker_factory

pytestmark = pytest.mark.integration


def request(*, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "job_id": f"v-{uuid.uuid4().hex[:8]}",
        "driver": "inmemory",
        "labels": labels or {},
        "template": {"image": "none", "command": ["echo", "hi"],
                     "driver_config": {"inmemory": {"run_seconds": 0}}},
    }  # fmt: skip


async def view_has(client: Client, job_id: str, phase: Phase) -> None:
    """Wait until a gateway's view shows `job_id` in `phase` (it follows the log)."""

    async def shows() -> bool:
        reply = await client.status(job_id)
        return reply.job is not None and reply.job.phase is phase

    await eventually(shows, timeout=30)


@pytest.fixture
async def fleet(settings: Settings) -> AsyncIterator[Client]:
    start_worker = worker_factory(settings, registered_driver("inmemory"))
    async with Gateway(settings), start_worker(slots=4), Client(settings=settings) as client:
        yield client


async def test_status_answers_from_the_view(fleet: Client, settings: Settings) -> None:
    done = await fleet.run(request(labels={"team": "a"}), timeout=60)
    job_id = done.job_id or ""
    await view_has(fleet, job_id, Phase.SUCCEEDED)
    job = (await fleet.status(job_id)).job
    assert job is not None
    assert (job.driver, job.host, job.exit_code) == ("inmemory", settings.host, done.exit_code)
    assert job.worker_id == done.worker_id and job.labels == {"team": "a"}
    assert job.submitted_by == "guest"
    assert (job.events[0].phase, job.events[-1].phase) == (Phase.ACCEPTED, Phase.SUCCEEDED)
    missing = await fleet.status("never-submitted")
    assert (missing.status, missing.job) == (ViewStatus.NOT_FOUND, None)


async def test_jobs_are_filtered_and_newest_first(fleet: Client) -> None:
    team = uuid.uuid4().hex[:6]
    ids = []
    for labels in ({"team": team, "n": "1"}, {"team": team, "n": "2"}, {"team": "other"}):
        ids.append((await fleet.run(request(labels=labels), timeout=60)).job_id or "")
    for job_id in ids:
        await view_has(fleet, job_id, Phase.SUCCEEDED)

    def listed(**filters: Any) -> Any:
        return fleet.query(ViewQuery(kind="jobs", **filters))

    assert [j.job_id for j in (await listed(labels={"team": team})).jobs or []] == ids[1::-1]
    assert [j.job_id for j in (await listed(labels={"team": team, "n": "1"})).jobs or []] == [
        ids[0]
    ]
    assert [j.job_id for j in (await listed(limit=1)).jobs or []] == [ids[2]]
    assert len((await listed(phase=Phase.SUCCEEDED, driver="inmemory")).jobs or []) == 3
    assert (await listed(phase=Phase.RUNNING)).jobs == []
    assert (await listed(submitted_by="nobody")).jobs == []
    assert (await listed(host="elsewhere")).jobs == []
    assert len((await listed(since_seconds=3600)).jobs or []) == 3


async def test_stats_are_percentiles_of_the_ended_jobs_timings(
    gateway: Gateway, client: Client, settings: Settings
) -> None:
    connection = await connect(settings.broker_url, name="test-events")
    async with connection:
        events = EventPublisher((await existing_topology(await connection.channel())).events)
        for n in range(1, 101):
            await publish_ended_job(events, "docker" if n % 2 else "vm", queued=float(n))
        old = datetime.now(UTC) - timedelta(hours=2)
        await publish_ended_job(events, "vm", queued=1000.0, at=old)
    await eventually(lambda: _counted(client, 101), timeout=30)
    stats = (await client.stats()).stats
    recent = (await client.stats(since_seconds=3600)).stats
    assert stats is not None and recent is not None
    queued = recent.stages["queued"]
    assert (queued.count, queued.p50, queued.p95, queued.p99) == (100, 50.0, 95.0, 99.0)
    every = stats.stages["queued"]
    assert (every.count, every.p99) == (101, 100.0)  # nearest rank: the 100th of 101
    assert recent.by_driver["docker"]["queued"].count == 50
    assert set(recent.by_host) == {"w1"}
    assert list(recent.stages) == ["queued", "running"]


async def _counted(client: Client, jobs: int) -> bool:
    stats = (await client.stats()).stats
    return stats is not None and stats.jobs == jobs


async def publish_ended_job(
    events: EventPublisher, driver: str, *, queued: float, at: datetime | None = None
) -> None:
    job_id, when = f"s-{uuid.uuid4().hex[:8]}", at or datetime.now(UTC)
    common: dict[str, Any] = {"job_id": job_id, "driver": driver, "timestamp": when}
    await events.publish(Event(phase=Phase.ACCEPTED, host="gw", submitted_by="guest", **common))
    await events.publish(
        Event(phase=Phase.SUCCEEDED, host="w1", worker_id="w1-1", exit_code=0,
              timings={"queued": queued, "running": 1.0, "bogus": 5.0}, **common)
    )  # fmt: skip


async def test_a_restarted_gateway_resumes_its_view_without_replaying_the_log(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    settings = make_settings(view_path=tmp_path / "kept" / "view.sqlite3")
    start_worker = worker_factory(settings, registered_driver("inmemory"))
    async with start_worker(slots=4), Client(settings=settings) as client:
        async with Gateway(settings) as first:
            done = [await client.run(request(), timeout=60) for _ in range(3)]
            await view_has(client, done[-1].job_id or "", Phase.SUCCEEDED)
            assert first.view.applied >= 9  # accepted, …, succeeded: three jobs' worth
        async with Gateway(settings) as second:
            assert second.view.applied == 0  # caught up at start, with nothing to apply
            again = await client.submit({**request(), "job_id": done[0].job_id})
            later = await client.run(request(), timeout=60)
            await view_has(client, later.job_id or "", Phase.SUCCEEDED)
            old = (await client.status(done[0].job_id or "")).job
            applied_for_one_job = second.view.applied
    assert again.duplicate and again.phase is Phase.SUCCEEDED  # the index came from the view
    assert old is not None and old.phase is Phase.SUCCEEDED
    assert applied_for_one_job < first.view.applied  # the new job's events, not the log's
    assert (
        settings.view_path.stat().st_mode & 0o777,
        settings.view_path.parent.stat().st_mode & 0o777,
    ) == (0o600, 0o700)


async def test_the_commands_answer_from_the_view_and_status_falls_back_to_the_log(
    settings: Settings,
) -> None:
    team = uuid.uuid4().hex[:6]
    env = sandfleet_env(settings, COLUMNS="300")
    start_worker = worker_factory(settings, registered_driver("inmemory"))
    async with start_worker(slots=2), Client(settings=settings) as client:
        async with Gateway(settings):
            done = await client.run(request(labels={"team": team}), timeout=60)
            job_id = done.job_id or ""
            await view_has(client, job_id, Phase.SUCCEEDED)
            listed = await run_sandfleet(env, "jobs", "--label", f"team={team}", "--json")
            text = await run_sandfleet(env, "jobs", "--phase", "succeeded", "--since", "1h")
            stats = await run_sandfleet(env, "stats", "--since", "1h", "--json")
            status = await run_sandfleet(env, "status", job_id)
            bad = await run_sandfleet(env, "jobs", "--since", "1y")
        fallback = await run_sandfleet(env, "status", job_id, "--json")
    assert [job["job_id"] for job in json.loads(listed.stdout)] == [job_id]
    assert job_id in text.stdout and text.returncode == 0
    # 1 once workers report timings (issue 11's metrics part), 0 before
    assert stats.returncode == 0 and json.loads(stats.stdout)["jobs"] in (0, 1)
    assert "worker: " + (done.worker_id or "") in status.stdout
    assert bad.returncode == 2 and "--since" in bad.stderr
    assert "no gateway answered" in fallback.stderr and "reading the event log" in fallback.stderr
    assert json.loads(fallback.stdout)["phase"] == "succeeded" and fallback.returncode == 0
