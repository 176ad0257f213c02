"""A worker's view of its host's GPUs: resolve requested IDs, claim, release, reconcile.
Every claim it looks up, adopts, attaches or releases is its own driver's.

Count-only requests are placed by topology (`placement.place`), decided under the claim
store's lock on the claims as they are. The claim store is synchronous (flock); its
calls run in a thread so a contended lock never stalls the worker's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from sandfleet.common.errors import FieldError, RequestInvalid
from sandfleet.workers.gpu.claims import Claim, GpuClaimStore, NotEnoughGpus
from sandfleet.workers.gpu.holdings import Holdings, Pick
from sandfleet.workers.gpu.inventory import Gpu, GpuInventory, MigDevice, UnknownGpu
from sandfleet.workers.gpu.placement import Placement, Topology, place

MIG_PROFILE_PATH = "resource_requirements.gpu.mig_profile"


@dataclass(frozen=True)
class GpuRequest:
    """Exact GPUs or MIG instances (with the names the job used for them), or any
    `count` free ones: whole GPUs, or MIG instances of `mig_profile`."""

    count: int
    exact: tuple[tuple[Gpu | MigDevice, str], ...] = ()
    mig_profile: str | None = None


class GpuAllocator:
    """`device_id` names a whole GPU to the driver's runtime; `mig_device_id` a MIG
    instance (None: the driver cannot pass MIG instances, and no job of it gets one)."""

    def __init__(
        self,
        inventory: GpuInventory,
        store: GpuClaimStore,
        *,
        driver: str,
        worker_id: str,
        device_id: Callable[[Gpu], str],
        mig_device_id: Callable[[MigDevice], str] | None = None,
    ) -> None:
        self.inventory = inventory
        self.topology = Topology.of(inventory)
        self._store = store
        self._driver = driver
        self._worker_id = worker_id
        self._device_id = device_id
        self._mig_device_id = mig_device_id

    def request(
        self,
        ids: Sequence[str],
        count: int,
        *,
        path: str,
        host: str,
        mig_profile: str | None = None,
    ) -> GpuRequest:
        """What the job asks for; RequestInvalid naming each ID this host does not have."""
        exact, errors = [], []
        for position, device in enumerate(ids):
            try:
                found = self.inventory.resolve_claimable(device)
            except UnknownGpu:
                message = f"no GPU {device!r} on host {host}"
            else:
                message = self._unfit(found, mig_profile)
                exact.append((found, device))
            if message:
                errors.append(FieldError(field=f"{path}.{position}", message=message))
        if mig_profile is not None and not ids:
            errors += self._profile_errors(mig_profile, host)
        if errors:
            raise RequestInvalid(errors)
        whole = {found.uuid for found, _ in exact if isinstance(found, Gpu)}
        sliced = {found.parent for found, _ in exact if isinstance(found, MigDevice)}
        uuids = [found.uuid for found, _ in exact]
        if len(set(uuids)) != len(uuids):
            message = "two IDs name the same physical GPU"
            raise RequestInvalid([FieldError(field=path, message=message)])
        if whole & sliced:
            message = "IDs name a whole GPU and one of its MIG instances"
            raise RequestInvalid([FieldError(field=path, message=message)])
        return GpuRequest(count=count, exact=tuple(exact), mig_profile=mig_profile)

    def _unfit(self, found: Gpu | MigDevice, mig_profile: str | None) -> str:
        """Why this job cannot have `found` ("" if it can)."""
        if isinstance(found, MigDevice) and self._mig_device_id is None:
            return f"the {self._driver} driver cannot pass MIG instances"
        if mig_profile is not None and getattr(found, "profile", None) != mig_profile:
            return f"is not a MIG instance of profile {mig_profile!r} ({MIG_PROFILE_PATH})"
        return ""

    def _profile_errors(self, profile: str, host: str) -> list[FieldError]:
        if self._mig_device_id is None:
            message = f"the {self._driver} driver cannot pass MIG instances"
        elif profile not in self.topology.mig:
            message = f"no MIG instance of profile {profile!r} on host {host}"
        else:
            return []
        return [FieldError(field=MIG_PROFILE_PATH, message=message)]

    def capacity(self, request: GpuRequest) -> int:
        """The most this host could ever give the request, all of it free."""
        if request.exact:
            return len(request.exact)
        if request.mig_profile is not None:
            return len(self.topology.mig.get(request.mig_profile, ()))
        return len(self.topology.whole)

    async def claim(self, job_id: str, request: GpuRequest) -> Claim:
        return (await self.claim_placed(job_id, request))[0]

    async def claim_placed(self, job_id: str, request: GpuRequest) -> tuple[Claim, Placement]:
        """Claim all of the request or nothing, and why these; GpuBusy / NotEnoughGpus
        when it must wait. A job that holds a claim already gets it back (`kept`)."""
        return await asyncio.to_thread(self.claim_placed_now, job_id, request)

    def claim_placed_now(self, job_id: str, request: GpuRequest) -> tuple[Claim, Placement]:
        """`claim_placed`, blocking on the store's lock in this thread."""
        if request.exact:
            claim = self._store.claim(
                job_id=job_id,
                gpus=[found.uuid for found, _ in request.exact],
                devices=[name for _, name in request.exact],
                parents=[self.topology.parent[found.uuid] for found, _ in request.exact],
                driver=self._driver,
                worker_id=self._worker_id,
            )
            return claim, Placement(claim.gpus, "exact")
        placed: list[Placement] = []
        claim = self._store.claim_chosen(
            job_id=job_id,
            driver=self._driver,
            worker_id=self._worker_id,
            choose=lambda held: self._choose(held, request, placed),
        )
        return claim, placed[0] if placed else Placement(claim.gpus, "kept")

    def _choose(self, held: Holdings, request: GpuRequest, placed: list[Placement]) -> list[Pick]:
        """Runs under the store's lock: the placement is made on the claims as they are."""
        parent = self.topology.parent
        # Drained and unhealthy GPUs (and their MIG instances) are no candidates at all.
        free = {i for i, gpu in parent.items() if held.takeable(i, gpu)}
        placement = place(self.topology, free, request.count, request.mig_profile)
        if placement is None:
            wanted = self._candidates(request)
            busy = {i: job for i in wanted if (job := held.holder(i, parent[i])) is not None}
            out = {i: why for i in wanted if (why := held.out_of_service(i, parent[i]))}
            free_count = sum(1 for i in wanted if i in free)
            what = "GPU(s)" if request.mig_profile is None else "MIG instance(s)"
            raise NotEnoughGpus(request.count, free_count, busy, out, what=what)
        placed.append(placement)
        return [(i, self._device_for(i), parent[i]) for i in placement.ids]

    def _candidates(self, request: GpuRequest) -> Collection[str]:
        if request.mig_profile is None:
            return self.topology.whole
        return [m.uuid for m in self.topology.mig.get(request.mig_profile, ())]

    def _device_for(self, claimable: str) -> str:
        found = self.inventory.resolve_claimable(claimable)
        if isinstance(found, MigDevice):
            assert self._mig_device_id is not None  # `request` refused MIG otherwise
            return self._mig_device_id(found)
        return self._device_id(found)

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
        """Whole GPUs a count-only job could claim now: a GPU in MIG mode is none."""
        free = await asyncio.to_thread(self._store.free, self.topology.whole)
        return len(free)

    async def reconcile(self, live_jobs: Collection[str]) -> list[Claim]:
        return await asyncio.to_thread(
            self._store.reconcile, driver=self._driver, live_jobs=live_jobs
        )
