"""A worker killed with SIGKILL mid-job: its GPU claim outlives it while the sandbox
runs, and reconciliation frees it once the sandbox is gone; a real worker process
(Podman's or Docker's) killed with a GPU job in hand leaves it to the next worker,
which finishes it on the same GPU, once."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.models import Job
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.workers.gpu.claims import GpuClaimStore, worker_alive
from sandfleet.workers.journal import JobJournal
from tests.support import eventually, until_terminal
from tests.support.gpus import FOUR_UUIDS, write_inventory
from tests.support.processes import signal_and_wait, worker_in_phase
from tests.support.runtimes import (
    TEST_CDI_KIND,
    TEST_IMAGE,
    WorkerFactory,
    containers_of,
    sandboxes_created,
)

pytestmark = pytest.mark.integration


async def test_sigkilled_workers_claim_stays_while_its_container_runs_then_is_freed(
    settings: Settings,
    docker_worker: WorkerFactory,
    docker: aiodocker.Docker,
    test_image: str,
    tmp_path: Path,
) -> None:
    job_id = f"crash-{uuid.uuid4().hex[:8]}"
    gpu = FOUR_UUIDS[2]
    store = GpuClaimStore(settings.state_dir)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.crashing_holder",
        str(settings.state_dir), "doomed-worker", job_id, gpu, test_image,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(30):
            assert (await holder.stdout.readline()).strip() == b"ready"
        holder.send_signal(signal.SIGKILL)
        await holder.wait()

        [claim] = store.claims()
        assert (claim.job_id, claim.worker_id, claim.gpus) == (job_id, "doomed-worker", (gpu,))
        assert not worker_alive(settings.state_dir, "doomed-worker")

        inventory = write_inventory(tmp_path / "gpus.json")
        async with docker_worker(gpu_inventory=inventory, reconcile_seconds=0.2) as worker:
            # Reconciled at start-up: the container still runs, so the claim stays.
            assert [c.job_id for c in store.claims()] == [job_id]
            assert worker.health().gpus_free == 3

            [container] = await containers_of(docker, job_id)
            await container.delete(force=True)

            async def freed() -> bool:
                return store.claims() == []

            await eventually(freed, timeout=10)
    finally:
        if holder.returncode is None:
            holder.kill()
        for container in await containers_of(docker, job_id):
            await container.delete(force=True)


@pytest.mark.parametrize("driver", ["podman", "docker"])
@pytest.mark.parametrize("kill_after", [Phase.CLAIMED, Phase.RUNNING])
async def test_sigkilled_worker_with_a_gpu_job_leaves_it_to_the_next_worker(
    kill_after: Phase,
    driver: str,
    settings: Settings,
    client: Client,
    request: pytest.FixtureRequest,
    test_cdi_spec: Path,
    tmp_path: Path,
) -> None:
    next_worker: WorkerFactory = request.getfixturevalue(f"{driver}_worker")
    inventory = write_inventory(tmp_path / "gpus.json")
    gpu_env = {"SANDFLEET_GPU_INVENTORY": str(inventory), "SANDFLEET_CDI_KIND": TEST_CDI_KIND}
    job_id = f"gk-{driver[0]}-{kill_after.value}-{uuid.uuid4().hex[:6]}"
    body: dict[str, Any] = {
        "job_id": job_id,
        "driver": driver,
        "resource_requirements": {"gpu": {"count": 1}},
        "template": {
            "image": TEST_IMAGE,
            "command": ["sh", "-c", "sleep 2; ls /dev | grep sandfleet-gpu"],
            "driver_config": {driver: {"gpu_device_ids": ["test.sandfleet/gpu=2"]}},
        },
    }
    store = GpuClaimStore(settings.state_dir)
    since = time.time()
    async with client.events(job_id=job_id) as stream:
        async with worker_in_phase(
            settings, client, stream, body, phase=kill_after, driver=driver, env=gpu_env
        ) as worker:
            await signal_and_wait(worker, signal.SIGKILL)
        [claim] = store.claims()  # the dead worker's claim stands
        assert (claim.job_id, claim.gpus) == (job_id, (FOUR_UUIDS[2],))

        async with next_worker(gpu_inventory=inventory, cdi_kind=TEST_CDI_KIND):
            history = await client.history(job_id)
            if not history[-1].phase.is_terminal:
                history += await until_terminal(stream, job_id, timeout=60)

    history = list({e.event_id: e for e in history}.values())
    terminal = [e for e in history if e.phase.is_terminal]
    assert [e.phase for e in terminal] == [Phase.SUCCEEDED], [e.phase for e in history]
    assert terminal[0].output == "sandfleet-gpu2\n"  # seen from inside: the one claimed GPU
    assert sandboxes_created(driver, since)[job_id] == 1
    assert store.claims() == []


async def test_a_dead_workers_claim_for_an_unfinished_job_goes_to_whoever_finishes_it(
    settings: Settings,
    client: Client,
    podman_worker: WorkerFactory,
    podman_image: str,
    test_cdi_spec: Path,
    tmp_path: Path,
) -> None:
    """A worker died after claiming GPU 2 and before any sandbox showed up (the runtime
    may still have been creating one, GPU inside). The claim must not be freed for
    another job: the worker that takes the job over runs it on GPU 2."""
    job_id = f"gc-{uuid.uuid4().hex[:8]}"
    body = {
        "job_id": job_id,
        "driver": "podman",
        "resource_requirements": {"gpu": {"count": 1}},
        "template": {"image": podman_image, "command": ["sh", "-c", "ls /dev | grep gpu"]},
    }
    job = Job.model_validate_json(json.dumps(body))
    JobJournal(settings.journal_dir, "podman", alive=lambda _: True).take(job, "dead-worker")
    store = GpuClaimStore(settings.state_dir)
    store.claim(
        job_id=job_id, gpus=[FOUR_UUIDS[2]], devices=[f"{TEST_CDI_KIND}=2"],
        driver="podman", worker_id="dead-worker",
    )  # fmt: skip

    inventory = write_inventory(tmp_path / "gpus.json")
    async with (
        client.events(job_id=job_id) as stream,
        podman_worker(gpu_inventory=inventory, cdi_kind=TEST_CDI_KIND),
    ):
        events = await until_terminal(stream, job_id, timeout=60)
    assert events[-1].phase is Phase.SUCCEEDED, events
    assert events[-1].gpus == [f"{TEST_CDI_KIND}=2"]
    assert events[-1].output == "sandfleet-gpu2\n"  # the claimed GPU, not the first free one
    assert store.claims() == []
