"""A worker killed with SIGKILL at any step of a job, then a new worker on the host:
the job reaches exactly one terminal phase, and at most one sandbox is ever created."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid

import aiodocker
import pytest

from common.events import Phase
from common.settings import Settings
from gateway.client import Client
from tests.conftest import WorkerFactory, containers_of
from tests.integration.test_job_flow import no_containers
from tests.support import eventually, until_terminal
from tests.worker_process import start_worker
from workers.gpu.claims import GpuClaimStore
from workers.journal import JournalEntry

pytestmark = pytest.mark.integration


def containers_created(job_id: str, since: float) -> int:
    """How many containers dockerd created for `job_id` (its event log, not ours)."""
    out = subprocess.run(
        [
            "docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
            "--filter", "type=container", "--filter", "event=create",
            "--filter", f"label=sandfleet.job_id={job_id}", "--format", "{{.Actor.ID}}",
        ],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return len(out.stdout.split())


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
        worker, _ = await start_worker(settings, client)
        try:
            assert (await client.submit(request)).accepted
            async with asyncio.timeout(30):
                async for event in stream:
                    if event.phase.value == kill_after:
                        break
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
        finally:
            if worker.returncode is None:
                worker.kill()

        async with docker_worker():  # the next worker on this host
            history = await client.history(job_id)
            if not history[-1].phase.is_terminal:
                history += await until_terminal(stream, job_id, timeout=60)
            await eventually(lambda: no_containers(docker, job_id), timeout=20)

    history = list({e.event_id: e for e in history}.values())  # the log may repeat an event
    terminal = [e for e in history if e.phase.is_terminal]
    assert [e.phase for e in terminal] == [Phase.SUCCEEDED], [e.phase for e in history]
    assert terminal[0].output == "one\ntwo\n"
    assert containers_created(job_id, since) == 1
    assert not await containers_of(docker, job_id)
    assert GpuClaimStore(settings.state_dir).claims() == []
    journal = settings.journal_dir / "docker"
    assert [
        JournalEntry.model_validate_json(p.read_bytes()).closed for p in journal.rglob("*.json")
    ] == [True]
