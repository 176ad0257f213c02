"""The Podman worker: same lifecycle as Docker's, and GPUs injected by CDI, proven
from inside the container."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.workers.drivers.podman.client import LibpodClient
from sandfleet.workers.drivers.podman.plugin import PodmanSettings
from sandfleet.workers.gpu.claims import GpuClaimStore
from tests.support import eventually, submit_and_wait, until_phase, until_terminal
from tests.support.gpus import GPU_PROBE, write_inventory
from tests.support.runtimes import TEST_CDI_KIND, WorkerFactory

pytestmark = pytest.mark.integration


@pytest.fixture
async def libpod(settings: Settings) -> AsyncIterator[LibpodClient]:
    client = LibpodClient(PodmanSettings().url)
    try:
        yield client
    finally:
        await client.aclose()


async def containers_of(libpod: LibpodClient, job_id: str) -> list[dict[str, Any]]:
    filters = json.dumps({"label": [f"sandfleet.job_id={job_id}"]})
    listed = await libpod.json(
        "GET", "containers", "json", params={"all": "true", "filters": filters}
    )
    return list(listed or [])


def request(image: str, *command: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": f"p-{uuid.uuid4().hex[:10]}",
        "driver": "podman",
        "template": {"image": image, "command": list(command), **extra.pop("template", {})},
        **extra,
    }


async def test_exit_code_and_output(
    client: Client, podman_worker: WorkerFactory, podman_image: str, libpod: LibpodClient
) -> None:
    req = request(podman_image, "sh", "-c", "echo hi; echo oops >&2; exit 3")
    async with podman_worker():
        events = await submit_and_wait(client, req)
    assert [e.phase for e in events] == [
        Phase.ACCEPTED,
        Phase.STARTING,
        Phase.RUNNING,
        Phase.FAILED,
    ]
    assert events[-1].driver == "podman"
    assert events[-1].exit_code == 3
    assert events[-1].output == "hi\noops\n"

    async def gone() -> bool:
        return not await containers_of(libpod, req["job_id"])

    await eventually(gone)


async def test_success_with_env_and_limits(
    client: Client, podman_worker: WorkerFactory, podman_image: str, libpod: LibpodClient
) -> None:
    show_limit = 'echo "$GREETING"; cat /sys/fs/cgroup/memory/memory.limit_in_bytes'
    req = request(
        podman_image, "sh", "-c", show_limit,
        template={"environment": {"GREETING": "hello"}},
        resource_requirements={"cpu": 0.5, "memory": "64Mi"},
    )  # fmt: skip
    async with podman_worker():
        events = await submit_and_wait(client, req)
    assert events[-1].phase is Phase.SUCCEEDED, events[-1]
    assert events[-1].output == f"hello\n{64 * 2**20}\n"


async def test_timeout_leaves_no_container(
    client: Client, podman_worker: WorkerFactory, podman_image: str, libpod: LibpodClient
) -> None:
    req = request(podman_image, "sleep", "60", template={"timeout_seconds": 1})
    async with podman_worker():
        events = await submit_and_wait(client, req)

        async def gone() -> bool:
            return not await containers_of(libpod, req["job_id"])

        await eventually(gone)
    assert events[-1].phase is Phase.TIMED_OUT


async def test_invalid_podman_block_is_rejected_with_its_path(
    client: Client, podman_worker: WorkerFactory, podman_image: str, libpod: LibpodClient
) -> None:
    req = request(
        podman_image, "true",
        template={"driver_config": {"podman": {"gpu_device_ids": ["nvidia.com/gpu=0"]}}},
    )  # fmt: skip
    async with podman_worker():
        events = await submit_and_wait(client, req)
    assert events[-1].phase is Phase.REJECTED
    assert [e.field for e in events[-1].errors] == ["template.driver_config.podman.gpu_device_ids"]
    assert not await containers_of(libpod, req["job_id"])


@pytest.fixture
def gpu_settings(tmp_path: Path, test_cdi_spec: Path) -> dict[str, Any]:
    return {"gpu_inventory": write_inventory(tmp_path / "gpus.json"), "cdi_kind": TEST_CDI_KIND}


async def test_gpu_job_gets_exactly_its_claimed_devices(
    settings: Settings,
    client: Client,
    podman_worker: WorkerFactory,
    podman_image: str,
    gpu_settings: dict[str, Any],
) -> None:
    req = request(podman_image, "sh", "-c", GPU_PROBE, resource_requirements={"gpu": {"count": 2}})
    async with podman_worker(**gpu_settings):
        events = await submit_and_wait(client, req)
    phases = [e.phase for e in events]
    assert phases == [Phase.ACCEPTED, Phase.CLAIMED, Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]
    assert events[-1].gpus == ["test.sandfleet/gpu=0", "test.sandfleet/gpu=1"]
    # Seen from inside the container: the two claimed devices and their env, nothing else.
    assert events[-1].output == (
        "sandfleet-gpu0\nsandfleet-gpu1\nSANDFLEET_TEST_GPU_0=present\nSANDFLEET_TEST_GPU_1=present\n"
    )
    assert GpuClaimStore(settings.state_dir).claims() == []


async def test_exact_gpu_id_gets_that_device(
    client: Client, podman_worker: WorkerFactory, podman_image: str, gpu_settings: dict[str, Any]
) -> None:
    req = request(
        podman_image, "sh", "-c", GPU_PROBE,
        resource_requirements={"gpu": {"count": 1}},
        template={"driver_config": {"podman": {"gpu_device_ids": ["test.sandfleet/gpu=2"]}}},
    )  # fmt: skip
    async with podman_worker(**gpu_settings):
        events = await submit_and_wait(client, req)
    assert events[-1].phase is Phase.SUCCEEDED
    assert events[-1].output == "sandfleet-gpu2\nSANDFLEET_TEST_GPU_2=present\n"


async def test_unresolvable_cdi_device_fails_with_podmans_reason_and_frees_the_claim(
    settings: Settings,
    client: Client,
    podman_worker: WorkerFactory,
    podman_image: str,
    gpu_settings: dict[str, Any],
    libpod: LibpodClient,
) -> None:
    # GPU 3 is in the inventory, but the CDI spec has no device 3.
    req = request(
        podman_image, "true",
        resource_requirements={"gpu": {"count": 1}},
        template={"driver_config": {"podman": {"gpu_device_ids": ["test.sandfleet/gpu=3"]}}},
    )  # fmt: skip
    async with podman_worker(**gpu_settings):
        events = await submit_and_wait(client, req)
    assert events[-1].phase is Phase.FAILED
    assert "unresolvable CDI devices test.sandfleet/gpu=3" in events[-1].message
    assert GpuClaimStore(settings.state_dir).claims() == []
    assert not await containers_of(libpod, req["job_id"])


async def test_docker_and_podman_jobs_never_hold_the_same_gpu_at_once(
    client: Client,
    podman_worker: WorkerFactory,
    docker_worker: WorkerFactory,
    podman_image: str,
    gpu_settings: dict[str, Any],
) -> None:
    gpu = {"gpu_device_ids": ["test.sandfleet/gpu=0"]}
    podman_req = request(
        podman_image, "sleep", "2",
        resource_requirements={"gpu": {"count": 1}},
        template={"driver_config": {"podman": gpu}},
    )  # fmt: skip
    docker_req: dict[str, Any] = {
        "job_id": f"d-{uuid.uuid4().hex[:10]}",
        "driver": "docker",
        "resource_requirements": {"gpu": {"count": 1}},
        "template": {
            "image": podman_image,
            "command": ["sh", "-c", GPU_PROBE],
            "driver_config": {"docker": gpu},
        },
    }
    async with (
        podman_worker(**gpu_settings),
        docker_worker(**gpu_settings, gpu_retry_seconds=0.3),
        client.events(job_id=podman_req["job_id"]) as podman_events,
        client.events(job_id=docker_req["job_id"]) as docker_events,
    ):
        assert (await client.submit(podman_req)).accepted
        await until_phase(podman_events, podman_req["job_id"], Phase.RUNNING)
        assert (await client.submit(docker_req)).accepted
        docker_history = await until_terminal(docker_events, docker_req["job_id"])
        podman_history = await until_terminal(podman_events, podman_req["job_id"])

    podman_done = podman_history[-1]
    assert podman_done.phase is Phase.SUCCEEDED
    docker_phases = [e.phase for e in docker_history]
    assert Phase.WAITING in docker_phases
    docker_claimed = next(e for e in docker_history if e.phase is Phase.CLAIMED)
    assert docker_claimed.timestamp >= podman_done.timestamp
    # Then Docker (CDI on) runs it on that GPU, seen from inside its container.
    assert docker_history[-1].phase is Phase.SUCCEEDED
    assert docker_history[-1].output == "sandfleet-gpu0\nSANDFLEET_TEST_GPU_0=present\n"


async def test_busy_gpus_make_a_job_wait_then_run_when_the_first_finishes(
    settings: Settings,
    client: Client,
    podman_worker: WorkerFactory,
    podman_image: str,
    gpu_settings: dict[str, Any],
) -> None:
    # Both want GPU 1; the first holds it for a few seconds.
    first = request(
        podman_image, "sleep", "3",
        resource_requirements={"gpu": {"count": 1}},
        template={"driver_config": {"podman": {"gpu_device_ids": ["test.sandfleet/gpu=1"]}}},
    )  # fmt: skip
    second = request(
        podman_image, "sh", "-c", GPU_PROBE,
        resource_requirements={"gpu": {"count": 1}},
        template={"driver_config": {"podman": {"gpu_device_ids": ["test.sandfleet/gpu=1"]}}},
    )  # fmt: skip
    async with (
        podman_worker(slots=2, gpu_retry_seconds=0.5, **gpu_settings),
        client.events(job_id=first["job_id"]) as first_events,
        client.events(job_id=second["job_id"]) as second_events,
    ):
        assert (await client.submit(first)).accepted
        await until_phase(first_events, first["job_id"], Phase.RUNNING)
        assert (await client.submit(second)).accepted
        second_history = await until_terminal(second_events, second["job_id"], timeout=60)
        first_history = await until_terminal(first_events, first["job_id"])
    phases = [e.phase for e in second_history]
    assert Phase.WAITING in phases
    assert phases[-1] is Phase.SUCCEEDED
    claimed = next(e for e in second_history if e.phase is Phase.CLAIMED)
    assert claimed.timestamp >= first_history[-1].timestamp  # only after the first let go
    assert second_history[-1].output == "sandfleet-gpu1\nSANDFLEET_TEST_GPU_1=present\n"
