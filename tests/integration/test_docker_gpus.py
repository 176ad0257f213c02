"""GPU jobs on Docker daemons that are not the host's (CDI on, test_gpu_jobs.py): private
dockerds started for this session (tests/support/private_dockerd.py). One has CDI off
and no NVIDIA runtime: a GPU job is claimed, fails `CapabilityMissing` saying what to
enable, and its claim is released. One has CDI off and the NVIDIA runtime (its hook a
stand-in): a GPU job gets the `nvidia` device driver with exactly its claimed GPUs'
UUIDs, seen from inside the container and by the hook.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.support import submit_and_wait
from tests.support.gpus import FOUR_UUIDS, write_inventory
from tests.support.private_dockerd import (
    PrivateDockerd,
    PrivateDockerdUnavailable,
    fake_nvidia_hook,
    hook_records,
    private_dockerd,
)
from tests.support.runtimes import (
    TEST_CDI_KIND,
    WorkerFactory,
    containers_of,
    registered_driver,
    worker_factory,
)

pytestmark = pytest.mark.integration

NO_CDI: dict[str, Any] = {"features": {"cdi": False}}
NVIDIA_RUNTIME: dict[str, Any] = {**NO_CDI, "runtimes": {"nvidia": {"path": "runc"}}}


@contextlib.contextmanager
def started_or_skipped(
    what: str, config: dict[str, Any], image: str, path_first: Path | None = None
) -> Iterator[PrivateDockerd]:
    stack = contextlib.ExitStack()
    try:
        daemon = stack.enter_context(
            private_dockerd(config, images=(image,), path_first=path_first)
        )
    except PrivateDockerdUnavailable as exc:
        pytest.skip(f"a private dockerd {what} cannot start here: {exc}")
    with stack:
        yield daemon


@pytest.fixture(scope="session")
def dockerd_without_cdi(test_image: str) -> Iterator[PrivateDockerd]:
    with started_or_skipped("without CDI", NO_CDI, test_image) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def hook_records_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nvidia-hook-records")


@pytest.fixture(scope="session")
def dockerd_with_nvidia(
    test_image: str, tmp_path_factory: pytest.TempPathFactory, hook_records_dir: Path
) -> Iterator[PrivateDockerd]:
    bin_dir = tmp_path_factory.mktemp("nvidia-hook-bin")
    fake_nvidia_hook(bin_dir, hook_records_dir)
    with started_or_skipped(
        "with the NVIDIA runtime", NVIDIA_RUNTIME, test_image, path_first=bin_dir
    ) as daemon:
        yield daemon


def worker_on(settings: Settings, daemon: PrivateDockerd, tmp_path: Path) -> WorkerFactory:
    factory = worker_factory(settings, registered_driver("docker", url=daemon.url))
    inventory = write_inventory(tmp_path / "gpus.json")
    return lambda **kw: factory(gpu_inventory=inventory, cdi_kind=TEST_CDI_KIND, **kw)


@contextlib.asynccontextmanager
async def engine(daemon: PrivateDockerd) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=daemon.url)
    try:
        yield client
    finally:
        await client.close()


def request(image: str, command: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": f"pd-{uuid.uuid4().hex[:10]}",
        "driver": "docker",
        "template": {"image": image, "command": ["sh", "-c", command], **extra},
    }


GPUS_2 = {"resource_requirements": {"gpu": {"count": 2}}}


async def test_a_daemon_without_cdi_fails_gpu_jobs_saying_what_to_enable(
    settings: Settings,
    client: Client,
    dockerd_without_cdi: PrivateDockerd,
    test_image: str,
    tmp_path: Path,
) -> None:
    plain = request(test_image, "echo plain")
    gpu_job = {**request(test_image, "echo never"), **GPUS_2}
    async with worker_on(settings, dockerd_without_cdi, tmp_path)() as worker:
        # The daemon runs containers: it is only GPUs it lacks.
        assert (await submit_and_wait(client, plain))[-1].output == "plain\n"
        events = await submit_and_wait(client, gpu_job)

    assert [e.phase for e in events] == [
        Phase.ACCEPTED,
        Phase.CLAIMED,
        Phase.STARTING,
        Phase.FAILED,
    ]
    failed = events[-1]
    assert failed.reason == "CapabilityMissing"
    assert "has CDI turned off" in failed.message
    assert '{"features": {"cdi": true}}' in failed.message
    assert "NVIDIA Container Toolkit" in failed.message
    assert worker.claims.claims() == []
    async with engine(dockerd_without_cdi) as docker:
        assert not await containers_of(docker, gpu_job["job_id"])


async def test_the_nvidia_runtime_gets_exactly_the_claimed_gpus_uuids(
    settings: Settings,
    client: Client,
    dockerd_with_nvidia: PrivateDockerd,
    hook_records_dir: Path,
    test_image: str,
    tmp_path: Path,
) -> None:
    # The job asks for every GPU through the toolkit's own variable: the device
    # driver's value, set after the job's, is the one the hook acts on.
    ids = [f"{TEST_CDI_KIND}=3", f"{TEST_CDI_KIND}={FOUR_UUIDS[1]}"]
    job = request(
        test_image,
        'echo "$NVIDIA_VISIBLE_DEVICES"; env | grep -c NVIDIA_VISIBLE_DEVICES',
        environment={"NVIDIA_VISIBLE_DEVICES": "all"},
        driver_config={"docker": {"gpu_device_ids": ids}},
    )
    job["resource_requirements"] = {"gpu": {"count": 2}}
    async with worker_on(settings, dockerd_with_nvidia, tmp_path)() as worker:
        events = await submit_and_wait(client, job)
    assert [e.phase for e in events] == [
        Phase.ACCEPTED,
        Phase.CLAIMED,
        Phase.STARTING,
        Phase.RUNNING,
        Phase.SUCCEEDED,
    ], events[-1].message
    wanted = f"{FOUR_UUIDS[3]},{FOUR_UUIDS[1]}"
    assert events[1].message == f"physical GPUs {FOUR_UUIDS[3]}, {FOUR_UUIDS[1]}"
    [container_id] = [e.sandbox_id for e in events if e.phase is Phase.RUNNING]
    [hook_run] = [r for cid, r in hook_records(hook_records_dir).items() if cid == container_id]
    assert hook_run["args"] == ["prestart"]
    visible = [v for v in hook_run["env"] if v.startswith("NVIDIA_VISIBLE_DEVICES=")]
    assert visible[-1] == f"NVIDIA_VISIBLE_DEVICES={wanted}"
    # Seen from inside the container: the claimed UUIDs, once (runc keeps the last).
    assert events[-1].output == f"{wanted}\n1\n"
    assert worker.claims.claims() == []
