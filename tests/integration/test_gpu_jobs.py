"""GPU jobs on a real Docker worker (Docker >= 25, CDI on) with a static 4-GPU inventory
and the test CDI spec: claiming, waiting, the devices seen from inside the container,
and the release of claims. A daemon without CDI (CapabilityMissing) and one with only
the NVIDIA runtime are in test_docker_gpus.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.common.topology import job_routing_key, retry_queue_name
from sandfleet.gateway.client import Client
from sandfleet.workers.gpu.claims import GpuClaimStore, WorkerLease
from tests.support import eventually, submit_and_wait, until_terminal
from tests.support.broker import ready_messages
from tests.support.gpus import FOUR_UUIDS, GPU_PROBE, write_inventory
from tests.support.runtimes import TEST_CDI_KIND, WorkerFactory, containers_of

pytestmark = pytest.mark.integration

UUIDS = FOUR_UUIDS


def gpu_request(
    image: str, count: int, ids: list[str] | None = None, command: str = GPU_PROBE
) -> dict[str, Any]:
    template: dict[str, Any] = {"image": image, "command": ["sh", "-c", command]}
    if ids:
        template["driver_config"] = {"docker": {"gpu_device_ids": ids}}
    return {
        "job_id": f"g-{uuid.uuid4().hex[:10]}",
        "resource_requirements": {"gpu": {"count": count}},
        "template": template,
    }


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    return write_inventory(tmp_path / "gpus.json")


@pytest.fixture
def gpu_worker(
    docker_worker: WorkerFactory, inventory_file: Path, test_cdi_spec: Path
) -> WorkerFactory:
    def start(**overrides: Any) -> Any:
        return docker_worker(
            **{
                "gpu_inventory": inventory_file,
                "cdi_kind": TEST_CDI_KIND,
                "gpu_retry_seconds": 0.3,
                **overrides,
            }
        )

    return start


async def test_docker_gpu_job_gets_exactly_its_claimed_devices(
    settings: Settings,
    client: Client,
    gpu_worker: WorkerFactory,
    docker: aiodocker.Docker,
    test_image: str,
) -> None:
    req = gpu_request(test_image, 2)
    async with gpu_worker() as worker:
        events = await submit_and_wait(client, req, timeout=30)

    assert [e.phase for e in events] == [
        Phase.ACCEPTED,
        Phase.CLAIMED,
        Phase.STARTING,
        Phase.RUNNING,
        Phase.SUCCEEDED,
    ], events[-1].message
    claimed, done = events[1], events[-1]
    assert claimed.gpus == ["test.sandfleet/gpu=0", "test.sandfleet/gpu=1"]
    # Chosen here from GPUs with no topology known: `any`, and said so.
    assert claimed.message == f"physical GPUs {UUIDS[0]}, {UUIDS[1]} (any)"
    assert claimed.placement is not None and claimed.placement.why == "any"
    # Seen from inside the container: the two claimed devices and their env, nothing else.
    assert done.output == (
        "sandfleet-gpu0\nsandfleet-gpu1\nSANDFLEET_TEST_GPU_0=present\nSANDFLEET_TEST_GPU_1=present\n"
    )
    assert worker.claims.claims() == []
    assert not await containers_of(docker, req["job_id"])


async def test_exact_ids_claim_those_gpus_by_any_alias(
    client: Client, gpu_worker: WorkerFactory, test_image: str
) -> None:
    ids = [f"{TEST_CDI_KIND}=2", f"{TEST_CDI_KIND}={UUIDS[1]}"]
    req = gpu_request(test_image, 2, ids=ids)
    async with gpu_worker():
        events = await submit_and_wait(client, req, timeout=30)
    claimed = next(e for e in events if e.phase is Phase.CLAIMED)
    assert claimed.gpus == ids
    assert claimed.message == f"physical GPUs {UUIDS[2]}, {UUIDS[1]}"
    assert events[-1].phase is Phase.SUCCEEDED
    assert events[-1].output == (
        "sandfleet-gpu1\nsandfleet-gpu2\nSANDFLEET_TEST_GPU_1=present\nSANDFLEET_TEST_GPU_2=present\n"
    )


async def test_a_gpu_the_cdi_spec_lacks_fails_with_dockers_reason_and_frees_the_claim(
    settings: Settings,
    client: Client,
    gpu_worker: WorkerFactory,
    docker: aiodocker.Docker,
    test_image: str,
) -> None:
    # GPU 3 is in the inventory, but the test CDI spec has no device 3.
    req = gpu_request(test_image, 1, ids=[f"{TEST_CDI_KIND}=3"])
    async with gpu_worker() as worker:
        events = await submit_and_wait(client, req, timeout=30)
    assert events[-1].phase is Phase.FAILED
    assert f"{TEST_CDI_KIND}=3" in events[-1].message
    assert worker.claims.claims() == []
    assert not await containers_of(docker, req["job_id"])


async def test_unknown_gpu_id_is_rejected_with_its_field_path(
    client: Client, gpu_worker: WorkerFactory, test_image: str
) -> None:
    req = gpu_request(test_image, 1, ids=[f"{TEST_CDI_KIND}=7"])
    async with gpu_worker() as worker:
        events = await submit_and_wait(client, req, timeout=30)
    assert events[-1].phase is Phase.REJECTED
    assert [(e.field, e.message) for e in events[-1].errors] == [
        (
            "template.driver_config.docker.gpu_device_ids.0",
            f"no GPU '{TEST_CDI_KIND}=7' on host {worker.identity.host}",
        )
    ]


async def next_phase(stream: Any, job_id: str, phase: Phase) -> Event:
    async with asyncio.timeout(20):
        async for event in stream:
            if event.job_id == job_id and event.phase is phase:
                return event  # type: ignore[no-any-return]
    raise AssertionError(f"no {phase} event")


async def test_busy_gpus_make_a_job_wait_then_proceed_when_freed(
    settings: Settings, client: Client, gpu_worker: WorkerFactory, test_image: str, tmp_path: Path
) -> None:
    # The first job holds all four GPUs: a VM job of another worker process on this host.
    store = GpuClaimStore(settings.state_dir)
    holder = WorkerLease(settings.state_dir, "vm-worker")
    holder.acquire()
    store.claim(job_id="vm-job", gpus=UUIDS, devices=UUIDS, driver="vm", worker_id="vm-worker")
    try:
        req = gpu_request(test_image, 1)
        async with (
            gpu_worker(slots=1, gpu_retry_seconds=1.5) as worker,
            client.events(job_id=req["job_id"]) as stream,
        ):
            assert (await client.submit(req)).accepted
            waiting = await next_phase(stream, req["job_id"], Phase.WAITING)
            assert waiting.reason == "GpusBusy"
            assert "held by job vm-job" in waiting.message
            # It waits in the retry queue, not in the worker: the slot is free and no GPU held.
            # Bound to this host first, the job waits in the host queue's retry queue.
            retry_queue = retry_queue_name(
                job_routing_key(worker.identity.driver, worker.identity.host)
            )

            async def parked() -> bool:
                depth = await ready_messages(settings.broker_url, retry_queue)
                return depth == 1 and worker.health().free_slots == 1

            await eventually(parked, timeout=5, interval=0.05)
            assert [c.job_id for c in store.claims()] == ["vm-job"]
            await next_phase(stream, req["job_id"], Phase.WAITING)  # retried, still busy

            store.release("vm-job", driver="vm")  # the first job finishes
            claimed = await next_phase(stream, req["job_id"], Phase.CLAIMED)
            events = await until_terminal(stream, req["job_id"])
        assert claimed.gpus == [f"{TEST_CDI_KIND}=0"]
        assert events[-1].phase is Phase.SUCCEEDED
        assert events[-1].output == "sandfleet-gpu0\nSANDFLEET_TEST_GPU_0=present\n"
        assert store.claims() == []
    finally:
        holder.release()


async def test_two_docker_jobs_never_hold_the_same_gpu_at_once(
    client: Client, gpu_worker: WorkerFactory, test_image: str
) -> None:
    # Both want GPU 1 on a worker with two slots; the first holds it for a few seconds.
    first = gpu_request(test_image, 1, ids=[f"{TEST_CDI_KIND}=1"], command="sleep 3")
    second = gpu_request(test_image, 1, ids=[f"{TEST_CDI_KIND}=1"])
    async with (
        gpu_worker(slots=2, gpu_retry_seconds=0.5),
        client.events(job_id=first["job_id"]) as first_events,
        client.events(job_id=second["job_id"]) as second_events,
    ):
        assert (await client.submit(first)).accepted
        await next_phase(first_events, first["job_id"], Phase.RUNNING)
        assert (await client.submit(second)).accepted
        second_history = await until_terminal(second_events, second["job_id"], timeout=60)
        first_history = await until_terminal(first_events, first["job_id"])
    assert first_history[-1].phase is Phase.SUCCEEDED
    assert Phase.WAITING in [e.phase for e in second_history]
    claimed = next(e for e in second_history if e.phase is Phase.CLAIMED)
    assert claimed.timestamp >= first_history[-1].timestamp  # only after the first let go
    assert second_history[-1].phase is Phase.SUCCEEDED
    assert second_history[-1].output == "sandfleet-gpu1\nSANDFLEET_TEST_GPU_1=present\n"


async def test_waiting_past_the_maximum_is_unschedulable(
    settings: Settings, client: Client, gpu_worker: WorkerFactory, test_image: str
) -> None:
    store = GpuClaimStore(settings.state_dir)
    holder = WorkerLease(settings.state_dir, "other")
    holder.acquire()
    store.claim(job_id="hog", gpus=UUIDS[:3], devices=UUIDS[:3], driver="podman", worker_id="other")
    try:
        req = gpu_request(test_image, 2)
        async with (
            gpu_worker(gpu_max_wait_seconds=1.0),
            client.events(job_id=req["job_id"]) as stream,
        ):
            assert (await client.submit(req)).accepted
            events = await until_terminal(stream, req["job_id"])
        phases = [e.phase for e in events]
        assert phases[0] is Phase.ACCEPTED and phases[-1] is Phase.FAILED
        assert set(phases[1:-1]) == {Phase.WAITING}
        assert events[-1].reason == "Unschedulable"
        assert "2 GPU(s) wanted, 1 free" in events[-1].message
        assert [c.job_id for c in store.claims()] == ["hog"]
    finally:
        holder.release()


async def test_more_gpus_than_the_host_has_is_unschedulable_at_once(
    client: Client, gpu_worker: WorkerFactory, test_image: str
) -> None:
    req = gpu_request(test_image, 5)
    async with gpu_worker():
        events = await submit_and_wait(client, req, timeout=30)
    assert [e.phase for e in events] == [Phase.ACCEPTED, Phase.FAILED]
    assert events[-1].reason == "Unschedulable"


async def test_heartbeats_carry_inventory_and_free_gpus(
    settings: Settings, client: Client, gpu_worker: WorkerFactory
) -> None:
    store = GpuClaimStore(settings.state_dir)
    store.claim(job_id="x", gpus=UUIDS[:1], devices=UUIDS[:1], driver="vm", worker_id="gone")
    async with client.events(phases={Phase.HEARTBEAT}) as stream, gpu_worker() as worker:
        async with asyncio.timeout(10):
            beat = await anext(aiter(stream))
    assert beat.worker_id == worker.identity.worker_id
    assert beat.health is not None
    assert [g["uuid"] for g in beat.health.gpus] == UUIDS
    assert beat.health.gpus_free == 3
    assert beat.health.gpu_source.startswith("file:")


async def test_gpus_command_shows_inventory_and_holders(
    settings: Settings, inventory_file: Path
) -> None:
    GpuClaimStore(settings.state_dir).claim(
        job_id="train-1",
        gpus=[UUIDS[2]],
        devices=["nvidia.com/gpu=2"],
        driver="docker",
        worker_id="w",
    )
    env = {
        **os.environ,
        "SANDFLEET_GPU_INVENTORY": str(inventory_file),
        "SANDFLEET_STATE_DIR": str(settings.state_dir),
        "SANDFLEET_JOURNAL_DIR": str(settings.journal_dir),
        "SANDFLEET_HOST": "gpuhost",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandfleet",
        "gpus",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    report = json.loads(out)
    assert report["host"] == "gpuhost"
    assert [g["claim"] and g["claim"]["job_id"] for g in report["gpus"]] == [
        None,
        None,
        "train-1",
        None,
    ]
    held = report["gpus"][2]["claim"]
    assert held["device"] == "nvidia.com/gpu=2"
    assert held["worker_alive"] is False
    assert held["since"]
