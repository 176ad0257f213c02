"""SIGTERM: the worker stops taking jobs and leaves within a bound; what happens to
running sandboxes is the `shutdown_policy` setting."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client, EventStream
from tests.support import eventually, sleeper, until_terminal
from tests.support.processes import signal_and_wait, worker_in_phase
from tests.support.runtimes import WorkerFactory, containers_of, no_containers

pytestmark = pytest.mark.integration


async def sigterm_while_running(
    settings: Settings, client: Client, stream: EventStream, request: dict[str, Any], policy: str
) -> tuple[asyncio.subprocess.Process, float]:
    """A worker with `policy` runs `request`; once it runs, SIGTERM. Returns the
    worker and how long it took to exit."""
    args = ("--on-shutdown", policy, "--drain-seconds", "1")
    async with worker_in_phase(settings, client, stream, request, *args) as worker:
        return worker, await signal_and_wait(worker, signal.SIGTERM)


async def test_sigterm_with_stop_policy_cancels_running_sandboxes(
    settings: Settings, client: Client, test_image: str, docker: aiodocker.Docker
) -> None:
    req = sleeper(test_image, 60)
    async with client.events(job_id=req["job_id"]) as stream:
        worker, took = await sigterm_while_running(settings, client, stream, req, "stop")
        events = await until_terminal(stream, req["job_id"])
    assert worker.returncode == 0
    assert took < 15
    assert events[-1].phase is Phase.CANCELLED
    assert "shut down" in events[-1].message
    await eventually(lambda: no_containers(docker, req["job_id"]))


async def test_sigterm_with_adopt_policy_leaves_the_sandbox_to_the_next_worker(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    req = sleeper(test_image, 6)
    async with client.events(job_id=req["job_id"]) as stream:
        _, took = await sigterm_while_running(settings, client, stream, req, "adopt")
        assert took < 15
        [container] = await containers_of(docker, req["job_id"])
        assert (await container.show())["State"]["Running"]

        async with docker_worker():  # the next worker on this host adopts it
            events = await until_terminal(stream, req["job_id"])
            await eventually(lambda: no_containers(docker, req["job_id"]))
    worker_events = [e for e in events if e.phase is not Phase.ACCEPTED]
    assert [(e.phase, e.reason) for e in worker_events] == [
        (Phase.RUNNING, "Adopted"),
        (Phase.SUCCEEDED, "Completed"),
    ]
    assert worker_events[-1].output == "up\ndone\n"
