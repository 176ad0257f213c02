"""A stand-in for a worker process caught mid-job, for SIGKILL tests.

It does what a Docker worker does for a GPU job up to `running` — takes its lease,
claims a GPU, creates and starts a labelled `sandfleet-<job>` container, records the
sandbox on the claim — then says "ready" and sleeps until killed: a worker stopped at
a known point, with no device request (the container is the claim's, not the GPU's).

    python -m tests.support.crashing_holder STATE_DIR WORKER_ID JOB_ID GPU_UUID IMAGE
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiodocker

from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_GPUS,
    LABEL_JOB_ID,
    LABEL_WORKER_ID,
    sandbox_name,
)
from sandfleet.workers.gpu.claims import GpuClaimStore, WorkerLease


async def main(state_dir: Path, worker_id: str, job_id: str, gpu: str, image: str) -> None:
    lease = WorkerLease(state_dir, worker_id)
    lease.acquire()
    store = GpuClaimStore(state_dir)
    store.claim(job_id=job_id, gpus=[gpu], devices=[gpu], driver="docker", worker_id=worker_id)
    docker = aiodocker.Docker()
    labels = {
        LABEL_JOB_ID: job_id,
        LABEL_DRIVER: "docker",
        LABEL_WORKER_ID: worker_id,
        LABEL_GPUS: gpu,
    }
    container = await docker.containers.create(
        {"Image": image, "Cmd": ["sleep", "300"], "Labels": labels}, name=sandbox_name(job_id)
    )
    await container.start()
    store.attach_sandbox(job_id, container.id, driver="docker")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    state, worker, job, gpu_uuid, image_name = sys.argv[1:6]
    asyncio.run(main(Path(state), worker, job, gpu_uuid, image_name))
