"""GPU drain and health through real Docker and Podman workers, with the test CDI spec
and a static 4-GPU inventory: a drained GPU is waited for while count-only jobs get
the others; a GPU marked unhealthy (in the claim store, as the NVML watcher marks it)
is told to its job, which by setting is stopped and fails `GpuUnhealthy`; heartbeats
and `sandfleet gpus --fleet` show both states."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client, EventStream
from sandfleet.workers.gpu.claims import GpuClaimStore
from tests.support import until_phase, until_terminal
from tests.support.cli import run_sandfleet, sandfleet_env
from tests.support.gpus import FOUR_UUIDS, write_inventory
from tests.support.runtimes import TEST_CDI_KIND, WorkerFactory

pytestmark = pytest.mark.integration

UUIDS = FOUR_UUIDS
GPU_PROBE = "ls /dev | grep sandfleet-gpu; env | grep SANDFLEET_TEST_GPU | sort"


def gpu_job(driver: str, command: str, *, ids: list[str] | None = None) -> dict[str, Any]:
    template: dict[str, Any] = {"image": "sandfleet-test/busybox:latest"}
    template["command"] = ["sh", "-c", command]
    if ids:
        template["driver_config"] = {driver: {"gpu_device_ids": ids}}
    return {
        "job_id": f"h-{uuid.uuid4().hex[:10]}",
        "driver": driver,
        "resource_requirements": {"gpu": {"count": len(ids or ()) or 1}},
        "template": template,
    }


@pytest.fixture(params=["docker", "podman"])
def runtime(request: pytest.FixtureRequest, test_cdi_spec: Path) -> str:
    # Each runtime's test image, built for it by its fixture.
    request.getfixturevalue("test_image" if request.param == "docker" else "podman_image")
    return str(request.param)


@pytest.fixture
def gpu_worker(request: pytest.FixtureRequest, runtime: str, tmp_path: Path) -> WorkerFactory:
    factory: WorkerFactory = request.getfixturevalue(f"{runtime}_worker")
    inventory = write_inventory(tmp_path / "gpus.json")

    def start(**overrides: Any) -> Any:
        return factory(gpu_inventory=inventory, cdi_kind=TEST_CDI_KIND, **overrides)

    return start


async def test_a_drained_gpu_is_waited_for_while_count_only_jobs_get_the_others(
    settings: Settings, client: Client, gpu_worker: WorkerFactory, runtime: str
) -> None:
    store = GpuClaimStore(settings.state_dir)
    store.drain(UUIDS[0], reason="fan swap", by="test")
    pinned = gpu_job(runtime, GPU_PROBE, ids=[f"{TEST_CDI_KIND}=0"])
    anyone = gpu_job(runtime, GPU_PROBE)
    async with (
        gpu_worker(slots=2, gpu_retry_seconds=0.3),
        client.events(job_id=pinned["job_id"]) as pinned_events,
        client.events(job_id=anyone["job_id"]) as anyone_events,
    ):
        assert (await client.submit(pinned)).accepted
        waiting = await until_phase(pinned_events, pinned["job_id"], Phase.WAITING)
        assert waiting.reason == "GpusUnavailable"
        assert waiting.message == f"{UUIDS[0]} drained: fan swap"

        assert (await client.submit(anyone)).accepted
        other = await until_terminal(anyone_events, anyone["job_id"], timeout=60)
        assert other[-1].phase is Phase.SUCCEEDED, other[-1]
        assert other[-1].gpus == [f"{TEST_CDI_KIND}=1"]  # the first GPU not drained
        assert other[-1].output == "sandfleet-gpu1\nSANDFLEET_TEST_GPU_1=present\n"

        waiting = await until_phase(pinned_events, pinned["job_id"], Phase.WAITING)  # again
        store.undrain(UUIDS[0])
        history = await until_terminal(pinned_events, pinned["job_id"], timeout=60)
    claimed = next(e for e in history if e.phase is Phase.CLAIMED)
    assert claimed.timestamp > waiting.timestamp
    assert history[-1].phase is Phase.SUCCEEDED, history[-1]
    assert history[-1].output == "sandfleet-gpu0\nSANDFLEET_TEST_GPU_0=present\n"
    assert store.claims() == []


async def test_a_job_whose_gpu_turns_unhealthy_is_stopped_by_setting(
    settings: Settings, client: Client, gpu_worker: WorkerFactory, runtime: str
) -> None:
    store = GpuClaimStore(settings.state_dir)
    job = gpu_job(runtime, "echo up; sleep 60", ids=[f"{TEST_CDI_KIND}=2"])
    async with (
        gpu_worker(heartbeat_seconds=0.3, gpu_unhealthy_action="stop"),
        client.events(job_id=job["job_id"]) as events,
    ):
        assert (await client.submit(job)).accepted
        await until_phase(events, job["job_id"], Phase.RUNNING)
        store.mark_unhealthy(UUIDS[2], "Xid 79: GPU has fallen off the bus")
        history = await until_terminal(events, job["job_id"], timeout=30)
    told = [e for e in history if e.reason == "GpuUnhealthy"]
    assert [e.phase for e in told] == [Phase.RUNNING, Phase.FAILED]
    assert told[-1].message == f"GPU {UUIDS[2]} is unhealthy: Xid 79: GPU has fallen off the bus"
    assert told[-1] is history[-1]
    assert store.claims() == []  # its sandbox removed, its claim released
    assert UUIDS[2] in store.unavailable()  # and no new job gets the GPU


async def beat_where(stream: EventStream, worker_id: str, check: Any) -> Event:
    async with asyncio.timeout(15):
        async for beat in stream:
            if beat.worker_id == worker_id and check(beat):
                return beat
    raise AssertionError("no such heartbeat")


@pytest.mark.parametrize("runtime", ["docker"], indirect=True)
async def test_a_noted_job_runs_on_and_heartbeats_and_the_fleet_view_show_states(
    settings: Settings, client: Client, gpu_worker: WorkerFactory, runtime: str
) -> None:
    store = GpuClaimStore(settings.state_dir)
    store.drain(UUIDS[0], reason="fan swap", by="test")
    job = gpu_job(runtime, "echo up; sleep 3; echo done", ids=[f"{TEST_CDI_KIND}=2"])
    async with (
        gpu_worker(heartbeat_seconds=0.3) as worker,
        client.events(job_id=job["job_id"]) as events,
        client.events(phases={Phase.HEARTBEAT}) as beats,
    ):
        assert (await client.submit(job)).accepted
        await until_phase(events, job["job_id"], Phase.RUNNING)
        store.mark_unhealthy(UUIDS[2], "Xid 48: double-bit ECC error")
        beat = await beat_where(
            beats, worker.identity.worker_id, lambda b: b.health.gpus[2]["health"] == "unhealthy"
        )
        fleet = await run_sandfleet(sandfleet_env(settings), "gpus", "--fleet", "--json")
        history = await until_terminal(events, job["job_id"], timeout=30)
    assert history[-1].phase is Phase.SUCCEEDED  # SANDFLEET_GPU_UNHEALTHY_ACTION=note
    assert history[-1].output == "up\ndone\n"
    notes = [e for e in history if e.reason == "GpuUnhealthy"]
    assert [(e.phase, e.message) for e in notes] == [
        (Phase.RUNNING, f"GPU {UUIDS[2]} is unhealthy: Xid 48: double-bit ECC error")
    ]
    health = beat.health
    assert health is not None
    assert (health.gpus[0]["drained"], health.gpus[0]["drain_reason"]) == (True, "fan swap")
    assert health.gpus[2]["health_reason"] == "Xid 48: double-bit ECC error"
    assert [g["health"] for g in health.gpus] == ["healthy", "healthy", "unhealthy", "healthy"]
    assert health.gpus_free == 2  # GPU 0 drained, GPU 2 held (and unhealthy)
    assert health.gpu_health_source == "none"  # no NVML on the test host

    assert fleet.returncode == 0, fleet.stderr
    [host] = [h for h in fleet.json_lines[0]["hosts"] if h["host"] == settings.host]
    assert [g["drained"] for g in host["gpus"]] == [True, False, False, False]
    assert host["gpus"][2]["health"] == "unhealthy"
