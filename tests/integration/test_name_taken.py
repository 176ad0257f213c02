"""A second create under a job's sandbox name is told apart from other failures: the
worker adopts that sandbox instead of failing the job (tests/faults/test_worker_kill.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from common.errors import SandboxNameTaken
from common.settings import Settings
from workers.drivers.base import LABEL_JOB_ID, SandboxDriver, SandboxSpec
from workers.drivers.docker import DockerDriver
from workers.drivers.podman import PodmanDriver

pytestmark = pytest.mark.integration


@pytest.fixture(params=["docker", "podman"])
async def driver(
    request: pytest.FixtureRequest, settings: Settings, test_image: str, podman_image: str
) -> AsyncIterator[SandboxDriver]:
    made: SandboxDriver = (
        DockerDriver(url=settings.docker_url)
        if request.param == "docker"
        else PodmanDriver(url=settings.podman_url)
    )
    try:
        yield made
    finally:
        await made.aclose()


async def test_creating_a_taken_name_raises_sandbox_name_taken(
    driver: SandboxDriver, test_image: str
) -> None:
    job_id = f"nt-{uuid.uuid4().hex[:8]}"
    spec = SandboxSpec(
        name=f"sandfleet-{job_id}",
        image=test_image,
        command=("true",),
        environment={},
        labels={LABEL_JOB_ID: job_id},
        cpu=None,
        memory_bytes=None,
    )
    first = await driver.create(spec)
    try:
        with pytest.raises(SandboxNameTaken, match="already in use"):
            await driver.create(spec)
        assert [s.sandbox_id for s in await driver.list_sandboxes() if s.job_id == job_id] == [
            first.sandbox_id
        ]
    finally:
        await driver.remove(first.sandbox_id)
