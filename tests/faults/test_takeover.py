"""Jobs taken over from a worker killed with SIGKILL: the take-over policy decides
whether their running sandboxes are adopted or stopped, and adopted jobs use the new
worker's slots like any other."""

from __future__ import annotations

import signal
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client, EventStream
from sandfleet.workers.gpu.claims import GpuClaimStore
from tests.support import eventually, sleeper, until_terminal
from tests.support.processes import signal_and_wait, worker_in_phase
from tests.support.runtimes import WorkerFactory, containers_of, no_containers

pytestmark = pytest.mark.integration


async def sigkill_while_running(
    settings: Settings, client: Client, stream: EventStream, request: dict[str, Any]
) -> None:
    """A worker process runs `request`; once it runs, the worker is killed (SIGKILL)."""
    async with worker_in_phase(settings, client, stream, request) as worker:
        await signal_and_wait(worker, signal.SIGKILL)


async def test_stop_policy_stops_a_taken_over_sandbox_and_reports_it(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    req = sleeper(test_image, 60)
    async with client.events(job_id=req["job_id"]) as stream:
        await sigkill_while_running(settings, client, stream, req)
        [container] = await containers_of(docker, req["job_id"])
        assert (await container.show())["State"]["Running"]

        async with docker_worker(takeover_policy="stop"):
            events = await until_terminal(stream, req["job_id"], timeout=30)
            await eventually(lambda: no_containers(docker, req["job_id"]))
    assert (events[-1].phase, events[-1].reason) == (Phase.CANCELLED, "StoppedOnTakeover")
    assert "SANDFLEET_TAKEOVER_POLICY=stop" in events[-1].message
    assert events[-1].output == "up\n"
    assert [e.phase for e in events] == [Phase.CANCELLED]  # not adopted: no second `running`
    assert GpuClaimStore(settings.state_dir).claims() == []


async def test_an_adopted_job_holds_a_slot_until_it_ends(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
) -> None:
    adopted, queued = sleeper(test_image, 4), sleeper(test_image, 0)
    async with client.events(job_id=adopted["job_id"]) as adopted_events:
        await sigkill_while_running(settings, client, adopted_events, adopted)
        async with (
            docker_worker(slots=1) as worker,
            client.events(job_id=queued["job_id"]) as queued_events,
        ):
            assert worker.health().free_slots == 0
            assert (await client.submit(queued)).accepted
            first = await until_terminal(adopted_events, adopted["job_id"])
            second = await until_terminal(queued_events, queued["job_id"])

    assert [(e.phase, e.reason) for e in first[-2:]] == [
        (Phase.RUNNING, "Adopted"),
        (Phase.SUCCEEDED, "Completed"),
    ]
    assert second[-1].phase is Phase.SUCCEEDED
    # The queued job waited for the slot: it was created only after the adopted one ended.
    created = next(e for e in second if e.phase is Phase.STARTING)
    assert created.timestamp >= first[-1].timestamp, _timeline(first + second)


def _timeline(events: list[Event]) -> list[tuple[str, str | None, str]]:
    return [(e.phase.value, e.job_id, e.timestamp.isoformat()) for e in events]


async def test_a_live_peer_takes_over_a_killed_workers_job_without_a_restart(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    req = sleeper(test_image, 3)
    async with (
        client.events(job_id=req["job_id"]) as stream,
        worker_in_phase(settings, client, stream, req) as victim,
        # The peer starts while the victim lives, so its start-up takes nothing over.
        docker_worker(reconcile_seconds=0.5) as peer,
    ):
        await signal_and_wait(victim, signal.SIGKILL)
        events = await until_terminal(stream, req["job_id"], timeout=30)
        await eventually(lambda: no_containers(docker, req["job_id"]))
    assert [(e.phase, e.reason) for e in events] == [
        (Phase.RUNNING, "Adopted"),
        (Phase.SUCCEEDED, "Completed"),
    ]
    assert {e.worker_id for e in events} == {peer.identity.worker_id}
    assert events[-1].output == "up\ndone\n"
