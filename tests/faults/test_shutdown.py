"""SIGTERM: the worker stops taking jobs and leaves within a bound; what happens to
running sandboxes is the `shutdown_policy` setting."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from typing import Any

import aiodocker
import pytest

from common.events import Phase
from common.settings import Settings
from gateway.client import Client
from tests.conftest import WorkerFactory, containers_of
from tests.integration.test_job_flow import no_containers
from tests.support import eventually, until_phase, until_terminal

pytestmark = pytest.mark.integration


async def start_worker(
    settings: Settings, client: Client, *args: str
) -> asyncio.subprocess.Process:
    """A worker process, returned once it serves (its first heartbeat is out)."""
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": settings.broker_url,
        "SANDFLEET_HOST": settings.host,
        "SANDFLEET_STATE_DIR": str(settings.state_dir),
        "SANDFLEET_JOURNAL_DIR": str(settings.journal_dir),
        "SANDFLEET_STOP_GRACE_SECONDS": "1",
    }
    async with client.events(phases={Phase.HEARTBEAT}, host=settings.host) as beats:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandfleet_cli", "worker", "--driver", "docker", *args,
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(30):
            await anext(aiter(beats))
    return process


async def sigterm(process: asyncio.subprocess.Process, *, bound: float) -> float:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(bound):
        await process.wait()
    return time.monotonic() - started


def sleeper(image: str, seconds: int) -> dict[str, Any]:
    return {
        "job_id": f"t-{uuid.uuid4().hex[:8]}",
        "template": {
            "image": image,
            "command": ["sh", "-c", f"echo up; sleep {seconds}; echo done"],
        },
    }


async def test_sigterm_with_stop_policy_cancels_running_sandboxes(
    settings: Settings, client: Client, test_image: str, docker: aiodocker.Docker
) -> None:
    req = sleeper(test_image, 60)
    async with client.events(job_id=req["job_id"]) as stream:
        worker = await start_worker(
            settings, client, "--on-shutdown", "stop", "--drain-seconds", "1"
        )
        try:
            assert (await client.submit(req)).accepted
            await until_phase(stream, req["job_id"], Phase.RUNNING)
            took = await sigterm(worker, bound=20)
        finally:
            if worker.returncode is None:
                worker.kill()
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
        worker = await start_worker(
            settings, client, "--on-shutdown", "adopt", "--drain-seconds", "1"
        )
        try:
            assert (await client.submit(req)).accepted
            await until_phase(stream, req["job_id"], Phase.RUNNING)
            took = await sigterm(worker, bound=20)
        finally:
            if worker.returncode is None:
                worker.kill()
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
