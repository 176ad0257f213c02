"""A worker killed with SIGKILL mid-job: its GPU claim outlives it while the sandbox
runs, and reconciliation frees it once the sandbox is gone."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from pathlib import Path

import aiodocker
import pytest

from common.settings import Settings
from tests.conftest import WorkerFactory, containers_of
from tests.gpu_fixtures import FOUR_UUIDS, write_inventory
from tests.support import eventually
from workers.gpu.claims import GpuClaimStore, worker_alive

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
        sys.executable, "-m", "tests.crashing_holder",
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
