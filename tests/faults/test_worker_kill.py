"""A worker killed with SIGKILL at any step of a job, then a new worker on the host:
the job reaches exactly one terminal phase, and at most one sandbox is ever created."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.workers.drivers.base import LABEL_DRIVER, LABEL_JOB_ID, SandboxState, sandbox_name
from sandfleet.workers.drivers.docker.driver import DockerDriver
from sandfleet.workers.drivers.docker.plugin import DockerSettings
from sandfleet.workers.gpu.claims import GpuClaimStore
from sandfleet.workers.journal import JournalEntry
from tests.support import eventually, submit_and_wait, until_terminal
from tests.support.processes import signal_and_wait, worker_in_phase
from tests.support.runtimes import (
    WorkerFactory,
    containers_of,
    no_containers,
    sandboxes_created,
    worker_factory,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kill_after", ["accepted", "starting", "running", "succeeded"])
async def test_sigkill_at_any_step_neither_loses_nor_duplicates_the_job(
    kill_after: str,
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    job_id = f"k-{kill_after}-{uuid.uuid4().hex[:6]}"
    request = {
        "job_id": job_id,
        "template": {"image": test_image, "command": ["sh", "-c", "echo one; sleep 3; echo two"]},
    }
    since = time.time()
    async with client.events(job_id=job_id) as stream:
        async with worker_in_phase(
            settings, client, stream, request, phase=Phase(kill_after)
        ) as worker:
            await signal_and_wait(worker, signal.SIGKILL)

        async with docker_worker():  # the next worker on this host
            history = await client.history(job_id)
            if not history[-1].phase.is_terminal:
                history += await until_terminal(stream, job_id, timeout=60)
            await eventually(lambda: no_containers(docker, job_id), timeout=20)

    history = list({e.event_id: e for e in history}.values())  # the log may repeat an event
    terminal = [e for e in history if e.phase.is_terminal]
    assert [e.phase for e in terminal] == [Phase.SUCCEEDED], [e.phase for e in history]
    assert terminal[0].output == "one\ntwo\n"
    assert sandboxes_created("docker", since)[job_id] == 1
    assert not await containers_of(docker, job_id)
    assert GpuClaimStore(settings.state_dir).claims() == []
    journal = settings.journal_dir / "docker"
    assert [
        JournalEntry.model_validate_json(p.read_bytes()).closed for p in journal.rglob("*.json")
    ] == [True]


class LateCreateDockerDriver(DockerDriver):
    """A real Docker driver whose first look for `late_name` misses: as when a dead
    worker's create request was still under way in dockerd when its job was taken over."""

    def __init__(self, late_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._late_name: str | None = late_name

    async def find(self, name: str) -> SandboxState | None:
        if name == self._late_name:
            self._late_name = None
            return None
        return await super().find(name)


async def test_a_create_that_lands_late_is_adopted_not_duplicated(
    settings: Settings, client: Client, test_image: str, docker: aiodocker.Docker
) -> None:
    job_id = f"late-{uuid.uuid4().hex[:8]}"
    since = time.time()
    # The dead worker's create, landed: same name and labels, its own command.
    await docker.containers.create(
        {
            "Image": test_image,
            "Cmd": ["sh", "-c", "echo created by the dead worker"],
            "Labels": {LABEL_JOB_ID: job_id, LABEL_DRIVER: "docker"},
        },
        name=sandbox_name(job_id),
    )
    request = {"job_id": job_id, "template": {"image": test_image, "command": ["echo", "again"]}}
    start = worker_factory(
        settings,
        lambda s: LateCreateDockerDriver(sandbox_name(job_id), url=DockerSettings().url),
    )
    async with start():
        events = await submit_and_wait(client, request)
        await eventually(lambda: no_containers(docker, job_id), timeout=20)
    assert [e.phase for e in events][-3:] == [Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]
    assert events[-1].output == "created by the dead worker\n"
    assert sandboxes_created("docker", since)[job_id] == 1
