"""A worker's warm pools: per profile, sandboxes made and started ahead of demand.

A job whose image, resources and driver block match a profile, and that asks for no
GPU, takes a ready sandbox instead of a new one (GPU jobs start cold: a sandbox's
devices are fixed when it is made, and a warm one holding GPUs would hold them from
every other job while it waits). A warm sandbox serves exactly one job and is removed
with it, as any job's sandbox is: nothing one job left is ever seen by the next.

Refilling is one sandbox at a time, in the background, so that it never takes the
runtime from jobs that are running or starting. Warm sandboxes carry their worker's id
and their profile's key (LABEL_POOL): a worker removes idle ones when it stops, and
those of a worker of its driver on this host that died.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandfleet.common.errors import RequestInvalid, SandboxError, SandboxNameTaken, SandfleetError
from sandfleet.common.models import Job, JobTemplate, ResourceRequirements
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_POOL,
    LABEL_WORKER_ID,
    WARM_NAME_PREFIX,
    DriverConfig,
    SandboxDriver,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    WarmSandboxes,
    WarmSpec,
)
from sandfleet.workers.warm_profiles import SETTING, PoolProfile, WarmPoolsInvalid

log = logging.getLogger(__name__)

# A take asks for a new sandbox this long after it: making one (a guest's boot above
# all) must not take the machine from the job that was just started.
REFILL_AFTER_TAKE_SECONDS = 1.0
RETRY_FIRST_SECONDS = 1.0
# Variables bash (an image's /bin/sh may be bash) keeps read-only: a warm container's
# shim could not give them a job's value, where a cold start does. Such jobs start cold.
SHELL_READONLY = frozenset({"BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID"})
RETRY_MAX_SECONDS = 60.0


@dataclass(eq=False)
class WarmPool:
    """One profile's ready sandboxes, as this worker made them."""

    profile: PoolProfile
    config: DriverConfig  # the profile's block, parsed by the driver as a job's is
    ready: deque[str] = field(default_factory=deque)  # sandbox ids, oldest first
    making: int = 0
    failures: int = 0  # creates failed in a row: the next waits longer
    last_error: str = ""

    @property
    def key(self) -> str:
        return self.profile.key

    @property
    def missing(self) -> int:
        return self.profile.count - len(self.ready) - self.making

    def matches(self, job: Job, config: DriverConfig) -> bool:
        wanted = job.resource_requirements
        return (
            job.template.image == self.profile.image
            and wanted.gpu_count == 0
            and not config.gpu_device_ids
            and wanted.cpu == self.profile.cpu
            and wanted.memory == self.profile.memory
            and config == self.config
            and not SHELL_READONLY.intersection(job.template.environment)
        )

    def health(self) -> dict[str, Any]:
        return {
            "pool": self.key,
            "image": self.profile.image,
            "ready": len(self.ready),
            "target": self.profile.count,
            "error": self.last_error,
        }


def bound_pools(driver: SandboxDriver[Any], profiles: list[PoolProfile]) -> list[WarmPool]:
    """Each profile with its block parsed by `driver`; WarmPoolsInvalid naming the field
    of any that a job could not have (or if the driver keeps no warm sandboxes)."""
    if profiles and not isinstance(driver, WarmSandboxes):
        raise WarmPoolsInvalid(f"{SETTING}: the {driver.name} driver keeps no warm sandboxes")
    pools, errors = [], []
    for index, profile in enumerate(profiles):
        try:
            pools.append(WarmPool(profile, driver.parse_config(_profile_job(driver, profile))))
        except RequestInvalid as exc:
            errors += [_renamed(error.field, index, driver.name) + f": {error.message}"
                       for error in exc.errors]  # fmt: skip
    if errors:
        raise WarmPoolsInvalid("; ".join(errors))
    return pools


def _profile_job(driver: SandboxDriver[Any], profile: PoolProfile) -> Job:
    return Job(
        job_id="warm-profile",
        driver=driver.name,
        resource_requirements=ResourceRequirements(cpu=profile.cpu, memory=profile.memory),
        template=JobTemplate(image=profile.image, driver_config=profile.driver_config),
    )


def _renamed(path: str, index: int, driver: str) -> str:
    """A job's field path as the profile's: template.driver_config.docker.x → …driver_config.x"""
    where = f"{SETTING}[{index}]"
    for job_path, profile_path in (
        (f"template.driver_config.{driver}", "driver_config"),
        ("template.image", "image"),
        ("resource_requirements.", ""),
    ):
        if path.startswith(job_path):
            return f"{where}.{profile_path}{path.removeprefix(job_path)}".replace("..", ".")
    return f"{where}: {path}"


class WarmPools:
    """`alive(worker_id)` says whether a worker of this host still runs."""

    def __init__(
        self,
        driver: SandboxDriver[Any],
        pools: list[WarmPool],
        *,
        worker_id: str,
        alive: Callable[[str], bool],
        refill_after_take_seconds: float = REFILL_AFTER_TAKE_SECONDS,
    ) -> None:
        self._driver = driver
        self._refill_after_take = refill_after_take_seconds
        self._warm: WarmSandboxes[Any] = driver  # type: ignore[assignment]  # bound_pools checked
        self.pools = pools
        self._worker_id = worker_id
        self._alive = alive
        self._wanted = asyncio.Event()
        self.full = asyncio.Event()  # set while every pool has all its sandboxes ready
        self._making: set[str] = set()  # names of the warm sandboxes being made
        self._taking: set[str] = set()  # ids of those being taken (no longer ready)
        self._refilling: asyncio.Task[None] | None = None
        self.served_warm = 0
        self.served_cold = 0

    # ---- taking ----

    async def take(
        self, job: Job, config: DriverConfig, spec: SandboxSpec[Any]
    ) -> tuple[str, SandboxState] | None:
        """A ready sandbox of the pool matching `job`, given `spec` (the job's), with
        that pool's key; None if no pool matches or none is ready, or the take failed
        (the job starts cold). SandboxNameTaken: the job's name exists (its sandbox,
        made by a worker now gone); the ready one stays in its pool.

        One try per job: a take that fails may have failed for the job's sake, not the
        sandbox's, and must not cost the pool more than the one sandbox (removed)."""
        pool = next((pool for pool in self.pools if pool.matches(job, config)), None)
        if pool is None or not pool.ready:
            return None
        sandbox_id = pool.ready.popleft()
        self.full.clear()
        asyncio.get_running_loop().call_later(self._refill_after_take, self._wanted.set)
        self._taking.add(sandbox_id)
        try:
            # Shielded: a take cut short by a shutdown's cancel could leave a sandbox
            # bearing the job's name with no job in it; finished, it is the job's.
            taken = await asyncio.shield(self._warm.take_warm(sandbox_id, spec))
        except SandboxNameTaken:
            pool.ready.appendleft(sandbox_id)
            raise
        except SandboxError as exc:
            log.warning("warm sandbox %s of pool %s: %s; removed", sandbox_id, pool.key, exc)
            await self._remove(sandbox_id)
            return None
        except BaseException:
            # Of any other kind (a runtime client's own error): the sandbox may bear the
            # job's name by now, and nothing else would ever remove it.
            await asyncio.shield(self._remove(sandbox_id))
            raise
        finally:
            self._taking.discard(sandbox_id)
        self.served_warm += 1
        return pool.key, taken

    # ---- the pools' life ----

    async def start(self) -> None:
        """Remove dead workers' warm sandboxes, then fill the pools in the background."""
        await self.remove_unowned()
        self._wanted.set()
        self._refilling = asyncio.create_task(self._refill_forever())

    async def aclose(self) -> None:
        """Stop refilling; remove every idle warm sandbox of this worker."""
        if self._refilling is not None:
            self._refilling.cancel()
            await asyncio.gather(self._refilling, return_exceptions=True)
        for pool in self.pools:
            while pool.ready:
                await self._remove(pool.ready.popleft())
        await self.remove_unowned(mine_too=True)  # a create cut short by the cancel

    async def remove_unowned(self, *, mine_too: bool = False) -> None:
        """Remove idle warm sandboxes that no live worker keeps: a dead worker's, and
        this worker's own that are neither ready (and running) nor being made (a create
        that landed after it failed, a shim or guest that died); with `mine_too`, every
        idle one of this worker's."""
        for sandbox in await self._driver.list_sandboxes():
            if LABEL_POOL not in sandbox.labels or sandbox.job_id is not None:
                continue  # not warm, or taken: a job's sandbox, the runtime's to clean up
            owner = sandbox.labels.get(LABEL_WORKER_ID, "")
            if owner == self._worker_id:
                if sandbox.name in self._making or sandbox.sandbox_id in self._taking:
                    continue  # a guest being booted can look stopped; a take renames
                ready = any(sandbox.sandbox_id in pool.ready for pool in self.pools)
                if ready and sandbox.status is not SandboxStatus.EXITED and not mine_too:
                    continue
                self._forget(sandbox.sandbox_id)
            elif self._alive(owner):
                continue
            log.info("removing warm sandbox %s (worker %s)", sandbox.sandbox_id, owner or "?")
            await self._remove(sandbox.sandbox_id)

    def _forget(self, sandbox_id: str) -> None:
        for pool in self.pools:
            if sandbox_id in pool.ready:
                pool.ready.remove(sandbox_id)
                self.full.clear()
                self._wanted.set()

    async def _refill_forever(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            for pool in self.pools:
                while pool.missing > 0:
                    if not await self._make_one(pool):
                        self._retry_later(pool)
                        break
            if all(pool.missing == 0 for pool in self.pools):
                self.full.set()

    async def _make_one(self, pool: WarmPool) -> bool:
        spec = WarmSpec(
            name=f"{WARM_NAME_PREFIX}{uuid.uuid4().hex[:16]}",
            worker_id=self._worker_id,
            pool=pool.key,
            image=pool.profile.image,
            cpu=pool.profile.cpu,
            memory_bytes=pool.profile.memory,
            config=pool.config,
            labels={
                LABEL_DRIVER: self._driver.name,
                LABEL_WORKER_ID: self._worker_id,
                LABEL_POOL: pool.key,
            },
        )
        pool.making += 1
        self._making.add(spec.name)
        try:
            made = await self._warm.create_warm(spec)
        except Exception as exc:  # of any kind: the pool waits, and tries again later
            pool.failures += 1
            pool.last_error = str(exc) if isinstance(exc, SandfleetError) else repr(exc)
            log.warning("warm pool %s (%s): %s", pool.key, pool.profile.image, pool.last_error)
            return False
        finally:
            pool.making -= 1
            self._making.discard(spec.name)
        pool.failures, pool.last_error = 0, ""
        pool.ready.append(made.sandbox_id)
        return True

    def _retry_later(self, pool: WarmPool) -> None:
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (pool.failures - 1))
        asyncio.get_running_loop().call_later(delay, self._wanted.set)

    async def _remove(self, sandbox_id: str) -> None:
        try:
            await self._driver.remove(sandbox_id)
        except SandboxError:
            log.exception("removing warm sandbox %s failed", sandbox_id)

    def health(self) -> list[dict[str, Any]]:
        return [pool.health() for pool in self.pools]
