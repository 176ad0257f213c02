"""A worker's view of its host's GPUs: resolve requested IDs, claim, release, reconcile.
Every claim it looks up, adopts, attaches or releases is its own driver's.

The claim store is synchronous (flock); its calls run in a thread so a contended
lock never stalls the worker's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from sandfleet.common.errors import FieldError, RequestInvalid
from sandfleet.workers.gpu.claims import Claim, GpuClaimStore
from sandfleet.workers.gpu.inventory import Gpu, GpuInventory, UnknownGpu


@dataclass(frozen=True)
class GpuRequest:
    """Exact GPUs (with the names the job used for them), or any `count` free ones."""

    count: int
    exact: tuple[tuple[Gpu, str], ...] = ()


class GpuAllocator:
    def __init__(
        self,
        inventory: GpuInventory,
        store: GpuClaimStore,
        *,
        driver: str,
        worker_id: str,
        device_id: Callable[[Gpu], str],
    ) -> None:
        self.inventory = inventory
        self._store = store
        self._driver = driver
        self._worker_id = worker_id
        self._device_id = device_id

    def request(self, ids: Sequence[str], count: int, *, path: str, host: str) -> GpuRequest:
        """What the job asks for; RequestInvalid naming each ID this host does not have."""
        exact, errors = [], []
        for position, device in enumerate(ids):
            try:
                exact.append((self.inventory.resolve(device), device))
            except UnknownGpu:
                errors.append(
                    FieldError(
                        field=f"{path}.{position}", message=f"no GPU {device!r} on host {host}"
                    )
                )
        if errors:
            raise RequestInvalid(errors)
        uuids = [gpu.uuid for gpu, _ in exact]
        if len(set(uuids)) != len(uuids):
            message = "two IDs name the same physical GPU"
            raise RequestInvalid([FieldError(field=path, message=message)])
        return GpuRequest(count=count, exact=tuple(exact))

    async def claim(self, job_id: str, request: GpuRequest) -> Claim:
        """Claim all of the request or nothing; GpuBusy / NotEnoughGpus when it must wait."""
        if request.exact:
            return await asyncio.to_thread(
                self._store.claim,
                job_id=job_id,
                gpus=[gpu.uuid for gpu, _ in request.exact],
                devices=[name for _, name in request.exact],
                driver=self._driver,
                worker_id=self._worker_id,
            )
        by_uuid = {gpu.uuid: gpu for gpu in self.inventory}
        return await asyncio.to_thread(
            self._store.claim_any,
            job_id=job_id,
            count=request.count,
            candidates=list(by_uuid),
            device_for=lambda uuid: self._device_id(by_uuid[uuid]),
            driver=self._driver,
            worker_id=self._worker_id,
        )

    async def attach(self, job_id: str, sandbox_id: str) -> None:
        await asyncio.to_thread(self._store.attach_sandbox, job_id, sandbox_id, driver=self._driver)

    async def adopt(self, job_id: str) -> Claim | None:
        """Take over the claim of a job whose sandbox this worker adopts."""
        return await asyncio.to_thread(
            self._store.adopt, job_id, driver=self._driver, worker_id=self._worker_id
        )

    async def release(self, job_id: str) -> None:
        await asyncio.to_thread(self._store.release, job_id, driver=self._driver)

    async def free_count(self) -> int:
        free = await asyncio.to_thread(self._store.free, [gpu.uuid for gpu in self.inventory])
        return len(free)

    async def reconcile(self, live_jobs: Collection[str]) -> list[Claim]:
        return await asyncio.to_thread(
            self._store.reconcile, driver=self._driver, live_jobs=live_jobs
        )
