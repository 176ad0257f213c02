"""The contract of a driver's warm sandboxes (`WarmSandboxes`), as a pytest suite any
driver that keeps them reuses.

    from sandfleet.workers.drivers.warm_contract import WarmContract, WarmJobMaker

    class TestMyDriverWarm(WarmContract):
        @pytest.fixture
        def make_driver(self) -> Callable[[], SandboxDriver[Any]]:
            return lambda: MyDriver(...)   # a new driver object per call

        @pytest.fixture
        def make_job(self) -> WarmJobMaker:
            ...  # a job for this driver running `command` (on `image` if given)

        @pytest.fixture
        def entrypoint_image(self) -> str:
            ...  # an image with ENTRYPOINT ["echo", "entrypoint-says"], CMD ["default-cmd"]

A taken warm sandbox must be what a cold one is: the runtime relies on exactly these
behaviours. Run against the driver's real runtime; needs pytest and pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import pytest

from sandfleet.common.errors import SandboxError, SandboxNameTaken
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_POOL,
    LABEL_WORKER_ID,
    WARM_NAME_PREFIX,
    SandboxDriver,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    WarmSandboxes,
    WarmSpec,
)
from sandfleet.workers.drivers.warm_shim import ORPHANED_EXIT_CODE

WAIT_SECONDS = 60.0
WORKER_ID = "warm-contract-worker"
POOL = "warm-contract-pool"
T = TypeVar("T")
# The container's memory limit, cpu quota and period, from cgroup v2 or v1.
READ_LIMITS = """cd /sys/fs/cgroup
if [ -f memory.max ]; then cat memory.max cpu.max
else cat memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us
fi"""


class WarmJobMaker(Protocol):
    def __call__(
        self,
        job_id: str,
        *,
        command: list[str],
        environment: dict[str, str] | None = None,
        cpu: float | None = None,
        memory: str | None = None,
        image: str | None = None,
    ) -> Job: ...


async def bounded(step: Awaitable[T]) -> T:
    async with asyncio.timeout(WAIT_SECONDS):
        return await step


def job_spec(driver: SandboxDriver[Any], job: Job) -> SandboxSpec[Any]:
    """The spec the runtime gives the driver for `job` (no GPUs)."""
    return SandboxSpec.for_job(
        job, driver.parse_config(job), driver=driver.name, worker_id=WORKER_ID
    )


def warm_spec(driver: SandboxDriver[Any], job: Job) -> WarmSpec[Any]:
    """The warm sandbox of the pool profile `job` matches (image, resources, block)."""
    spec = job_spec(driver, job)
    return WarmSpec(
        name=f"{WARM_NAME_PREFIX}{uuid.uuid4().hex[:12]}",
        worker_id=WORKER_ID,
        pool=POOL,
        image=spec.image,
        cpu=spec.cpu,
        memory_bytes=spec.memory_bytes,
        config=spec.config,
        labels={LABEL_DRIVER: driver.name, LABEL_WORKER_ID: WORKER_ID, LABEL_POOL: POOL},
    )


def new_job_id() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


class WarmContract:
    """Subclass it as `Test<Name>Warm`; provide `make_driver`, `make_job` and
    `entrypoint_image`."""

    @pytest.fixture
    async def driver(
        self, make_driver: Callable[[], SandboxDriver[Any]]
    ) -> AsyncIterator[SandboxDriver[Any]]:
        made = make_driver()
        yield made
        await made.aclose()

    @pytest.fixture
    async def warm(
        self, driver: SandboxDriver[Any]
    ) -> AsyncIterator[Callable[[Job], Awaitable[SandboxState]]]:
        """Makes a warm sandbox for `job`'s profile; removes what is left afterwards."""
        made: list[str] = []

        async def make(job: Job) -> SandboxState:
            assert isinstance(driver, WarmSandboxes)
            state = await bounded(driver.create_warm(warm_spec(driver, job)))
            made.append(state.sandbox_id)
            return state

        yield make
        for sandbox_id in made:
            await driver.remove(sandbox_id)

    @staticmethod
    async def take(driver: SandboxDriver[Any], sandbox_id: str, job: Job) -> SandboxState:
        assert isinstance(driver, WarmSandboxes)
        return await bounded(driver.take_warm(sandbox_id, job_spec(driver, job)))

    async def run_taken(
        self,
        driver: SandboxDriver[Any],
        warm: Callable[[Job], Awaitable[SandboxState]],
        job: Job,
    ) -> tuple[int, bytes]:
        """Takes a warm sandbox for `job`: its exit code and all it printed, followed."""
        waiting = await warm(job)
        taken = await self.take(driver, waiting.sandbox_id, job)
        assert (taken.sandbox_id, taken.status) == (waiting.sandbox_id, SandboxStatus.RUNNING)
        followed = b"".join([chunk async for chunk in driver.follow_output(taken.sandbox_id)])
        return await bounded(driver.wait(taken.sandbox_id)), followed

    def test_the_driver_keeps_warm_sandboxes(self, driver: SandboxDriver[Any]) -> None:
        assert isinstance(driver, WarmSandboxes)

    async def test_a_taken_sandbox_runs_the_jobs_argv_and_environment_exactly(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
    ) -> None:
        hostile = ["a b 'c' \"d\"", "$(echo no)`echo no`\\n", "é€", "", "ends\n\n"]
        # One write of whole lines: the runtime may log stderr's line between two
        # reads of stdout, which would cut a line printed piecewise.
        script = (
            'o=; for a in "$@"; do o="$o[$a]"; done; printf "%s<%s>\\n" "$o" "$V"; echo err >&2'
        )
        value = "line one\n$HOME $(echo no)\n"
        job = make_job(
            new_job_id(),
            command=["sh", "-c", f"{script}; exit 7", "sh", *hostile],
            environment={"V": value, "_sandfleet_v": "the job's"},
        )
        code, followed = await self.run_taken(driver, warm, job)
        printed = "".join(f"[{a}]" for a in hostile) + f"<{value}>\n"
        assert code == 7
        assert sorted(followed.decode().splitlines()) == sorted([*printed.splitlines(), "err"])

    async def test_the_job_sees_a_variable_named_like_the_shims_own(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
    ) -> None:
        environment = {"_sandfleet_kind": "k", "_sandfleet_enc": "e", "_sandfleet_v": "v"}
        script = 'printf "%s," "$_sandfleet_kind" "$_sandfleet_enc" "$_sandfleet_v"'
        job = make_job(new_job_id(), command=["sh", "-c", script], environment=environment)
        assert await self.run_taken(driver, warm, job) == (0, b"k,e,v,")

    async def test_a_taken_sandbox_has_the_jobs_cgroup_limits(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
    ) -> None:
        job = make_job(new_job_id(), command=["sh", "-c", READ_LIMITS], cpu=0.5, memory="64Mi")
        code, followed = await self.run_taken(driver, warm, job)
        assert (code, followed.decode().split()) == (0, ["67108864", "50000", "100000"])

    async def test_found_by_the_jobs_name_once_taken_and_listed_as_pooled_before(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
    ) -> None:
        job = make_job(new_job_id(), command=["sleep", "600"])
        waiting = await warm(job)
        assert waiting.job_id is None and waiting.status is SandboxStatus.RUNNING
        listed = {s.sandbox_id: s for s in await driver.list_sandboxes()}
        assert listed[waiting.sandbox_id].labels.get(LABEL_POOL) == POOL
        assert listed[waiting.sandbox_id].job_id is None
        taken = await self.take(driver, waiting.sandbox_id, job)
        found = await driver.find(taken.name)
        assert found is not None and found.sandbox_id == waiting.sandbox_id
        assert (found.job_id, found.status, found.started_at) == (
            job.job_id,
            SandboxStatus.RUNNING,
            None,
        )
        assert (taken.job_id, taken.name) == (job.job_id, found.name)

    async def test_a_name_in_use_leaves_the_sandbox_waiting_and_takeable(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
    ) -> None:
        holder = await warm(make_job(new_job_id(), command=["true"]))
        waiting = await warm(make_job(new_job_id(), command=["true"]))
        first = make_job(new_job_id(), command=["echo", "first"])
        await self.take(driver, holder.sandbox_id, first)
        with pytest.raises(SandboxNameTaken):
            await self.take(driver, waiting.sandbox_id, first)
        still = await driver.find(waiting.name)
        assert still is not None and still.status is SandboxStatus.RUNNING
        second = make_job(new_job_id(), command=["echo", "second"])
        taken = await self.take(driver, waiting.sandbox_id, second)
        assert await bounded(driver.wait(taken.sandbox_id)) == 0
        assert await driver.output(taken.sandbox_id, lines=5) == "second\n"

    async def test_a_sandbox_taken_or_exited_cannot_be_taken(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
    ) -> None:
        once = await warm(make_job(new_job_id(), command=["true"]))
        await self.take(driver, once.sandbox_id, make_job(new_job_id(), command=["true"]))
        with pytest.raises(SandboxError):
            await self.take(driver, once.sandbox_id, make_job(new_job_id(), command=["true"]))
        ended = await warm(make_job(new_job_id(), command=["true"]))
        await bounded(driver.stop(ended.sandbox_id, grace_seconds=1))
        await bounded(driver.wait(ended.sandbox_id))
        late = make_job(new_job_id(), command=["true"])
        with pytest.raises(SandboxError):
            await self.take(driver, ended.sandbox_id, late)

    async def test_waiting_sandboxes_of_a_closed_driver_end_without_running_anything(
        self,
        driver: SandboxDriver[Any],
        make_driver: Callable[[], SandboxDriver[Any]],
        make_job: WarmJobMaker,
    ) -> None:
        maker = make_driver()  # the dead worker's: its connections close with it
        assert isinstance(maker, WarmSandboxes)
        job = make_job(new_job_id(), command=["true"])
        states = [await bounded(maker.create_warm(warm_spec(maker, job))) for _ in range(2)]
        await maker.aclose()
        try:
            for state in states:
                assert await bounded(driver.wait(state.sandbox_id)) == ORPHANED_EXIT_CODE
                said = await driver.output(state.sandbox_id, lines=5)
                assert "no job ran" in said
        finally:
            for state in states:
                await driver.remove(state.sandbox_id)

    async def test_a_taken_sandbox_stops_and_is_removed_as_a_cold_one(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
    ) -> None:
        job = make_job(new_job_id(), command=["sleep", "600"])
        taken = await self.take(driver, (await warm(job)).sandbox_id, job)
        waited = asyncio.ensure_future(driver.wait(taken.sandbox_id))
        await bounded(driver.stop(taken.sandbox_id, grace_seconds=1))
        assert await bounded(waited) != 0
        stopped = await driver.find(taken.name)
        assert stopped is not None and stopped.status is SandboxStatus.EXITED
        await bounded(driver.remove(taken.sandbox_id))
        assert await driver.find(taken.name) is None
        await driver.remove(taken.sandbox_id)  # gone already: no error

    @pytest.mark.parametrize(
        ("command", "printed"),
        [(["job-arg"], "entrypoint-says job-arg\n"), ([], "entrypoint-says default-cmd\n")],
    )
    async def test_the_images_entrypoint_and_cmd_are_honoured(
        self,
        driver: SandboxDriver[Any],
        make_job: WarmJobMaker,
        warm: Callable[[Job], Awaitable[SandboxState]],
        entrypoint_image: str,
        command: list[str],
        printed: str,
    ) -> None:
        job = make_job(new_job_id(), command=command, image=entrypoint_image)
        assert await self.run_taken(driver, warm, job) == (0, printed.encode())
