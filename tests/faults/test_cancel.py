"""`sandfleet cancel` works whether the job is queued, waiting for GPUs or running."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiodocker
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.common.topology import declare_topology
from sandfleet.gateway.client import Client
from sandfleet.workers.gpu.claims import GpuClaimStore, WorkerLease
from tests.support import until_phase, until_terminal
from tests.support.cli import sandfleet
from tests.support.gpus import FOUR_UUIDS, write_inventory
from tests.support.runtimes import WorkerFactory, containers_of

pytestmark = pytest.mark.integration


def job(image: str, *command: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": f"c-{uuid.uuid4().hex[:8]}",
        "template": {"image": image, "command": list(command)},
        **extra,
    }


async def test_cancel_a_running_job(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    req = job(test_image, "sh", "-c", "echo started; sleep 60")
    async with docker_worker(), client.events(job_id=req["job_id"]) as stream:
        assert (await client.submit(req)).accepted
        await until_phase(stream, req["job_id"], Phase.RUNNING)
        rc, out = await sandfleet(settings, "cancel", req["job_id"], "--reason", "no longer needed")
        assert rc == 0 and "cancellation" in out
        events = await until_terminal(stream, req["job_id"])
    assert events[-1].phase is Phase.CANCELLED
    assert events[-1].message == "no longer needed"
    assert events[-1].output == "started\n"
    assert not await containers_of(docker, req["job_id"])


async def test_a_job_cancelled_while_queued_never_starts(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    # The queue exists (a worker served it once) but no worker runs now.
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        await declare_topology(
            connection, await connection.channel(), job_queues=[("docker", None)]
        )
    req = job(test_image, "touch", "/should-not-run")
    async with client.events(job_id=req["job_id"]) as stream:
        assert (await client.submit(req)).accepted
        await client.cancel(req["job_id"])
        async with docker_worker():  # starts after the cancellation was sent
            events = await until_terminal(stream, req["job_id"])
    assert [e.phase for e in events] == [Phase.ACCEPTED, Phase.CANCELLED]
    assert events[-1].reason == "CancelledBeforeStart"
    assert not await containers_of(docker, req["job_id"])


async def test_cancel_a_job_waiting_for_gpus(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    tmp_path: Path,
) -> None:
    store = GpuClaimStore(settings.state_dir)
    hog = WorkerLease(settings.state_dir, "hog-worker")
    hog.acquire()
    store.claim(
        job_id="hog", gpus=FOUR_UUIDS, devices=FOUR_UUIDS, driver="vm", worker_id="hog-worker"
    )
    try:
        req = job(test_image, "true", resource_requirements={"gpu": {"count": 1}})
        inventory = write_inventory(tmp_path / "gpus.json")
        async with (
            docker_worker(gpu_inventory=inventory, gpu_retry_seconds=0.5),
            client.events(job_id=req["job_id"]) as stream,
        ):
            assert (await client.submit(req)).accepted
            await until_phase(stream, req["job_id"], Phase.WAITING)
            await client.cancel(req["job_id"])
            events = await until_terminal(stream, req["job_id"])
        assert events[-1].phase is Phase.CANCELLED
        assert Phase.CLAIMED not in [e.phase for e in events]
        assert [c.job_id for c in store.claims()] == ["hog"]
    finally:
        hog.release()
