"""The contract every sandbox driver keeps, as a pytest suite any driver's tests reuse.

    from sandfleet.workers.drivers.contract import DriverContract, JobMaker

    class TestMyDriver(DriverContract):
        @pytest.fixture
        async def driver(self) -> AsyncIterator[SandboxDriver[Any]]:
            made = MyDriver(...)
            yield made
            await made.aclose()

        @pytest.fixture
        def make_job(self) -> JobMaker:
            # a job for this driver whose sandbox prints `line`, runs about
            # `run_seconds`, then exits with `exit_code`
            ...

Run against the driver's real runtime: the runtime relies on exactly these behaviours
(see README.md beside this file). Needs pytest and pytest-asyncio (asyncio_mode=auto).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import pytest

from sandfleet.common.errors import RequestInvalid, SandboxNameTaken
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    SandboxDriver,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
)
from sandfleet.workers.gpu.inventory import Gpu

WAIT_SECONDS = 120.0  # a VM under software emulation takes several seconds to boot


class JobMaker(Protocol):
    def __call__(
        self, job_id: str, *, line: str, exit_code: int = 0, run_seconds: float = 0
    ) -> Job: ...


T = TypeVar("T")


async def _bounded(step: Awaitable[T]) -> T:
    async with asyncio.timeout(WAIT_SECONDS):
        return await step


class DriverContract:
    """Subclass it as `Test<Name>Contract` and provide the `driver` and `make_job` fixtures."""

    @pytest.fixture
    async def created(
        self, driver: SandboxDriver[Any], make_job: JobMaker
    ) -> AsyncIterator[Callable[..., Awaitable[SandboxState]]]:
        """Creates sandboxes for the test's jobs; removes whatever is left afterwards."""
        made: list[str] = []

        async def create(**job: Any) -> SandboxState:
            spec = self.spec(driver, make_job(f"c{uuid.uuid4().hex[:10]}", **job))
            state = await _bounded(driver.create(spec))
            made.append(state.sandbox_id)
            return state

        yield create
        for sandbox_id in made:
            await driver.remove(sandbox_id)

    @staticmethod
    def spec(driver: SandboxDriver[Any], job: Job) -> SandboxSpec[Any]:
        """The spec the runtime gives the driver for `job` (no GPUs)."""
        return SandboxSpec.for_job(
            job, driver.parse_config(job), driver=driver.name, worker_id="contract-worker"
        )

    async def test_an_unknown_key_in_the_block_is_refused_by_its_full_path(
        self, driver: SandboxDriver[Any], make_job: JobMaker
    ) -> None:
        job = make_job("c-unknown", line="x")
        block = {**job.template.driver_config, "no_such_key": 1}
        template = job.template.model_copy(update={"driver_config": block})
        with pytest.raises(RequestInvalid) as refused:
            driver.parse_config(job.model_copy(update={"template": template}))
        fields = [error.field for error in refused.value.errors]
        assert f"template.driver_config.{driver.name}.no_such_key" in fields

    async def test_a_created_sandbox_is_found_by_name_and_listed_with_its_labels(
        self, driver: SandboxDriver[Any], created: Callable[..., Awaitable[SandboxState]]
    ) -> None:
        state = await created(line="x")
        assert state.status is SandboxStatus.CREATED
        found = await driver.find(state.name)
        assert found is not None and found.sandbox_id == state.sandbox_id
        assert found.job_id is not None and state.name == f"sandfleet-{found.job_id}"
        assert found.labels.get(LABEL_DRIVER) == driver.name
        listed = {s.sandbox_id: s for s in await driver.list_sandboxes()}
        assert listed[state.sandbox_id].job_id == found.job_id

    async def test_a_started_sandbox_ends_with_its_exit_code_and_output(
        self, driver: SandboxDriver[Any], created: Callable[..., Awaitable[SandboxState]]
    ) -> None:
        state = await created(line="contract-says-hello", exit_code=3)
        await driver.start(state.sandbox_id)
        assert await _bounded(driver.wait(state.sandbox_id)) == 3
        assert "contract-says-hello" in await driver.output(state.sandbox_id, lines=20)
        ended = await driver.find(state.name)
        assert ended is not None
        assert (ended.status, ended.exit_code) == (SandboxStatus.EXITED, 3)
        assert ended.started_at is not None

    async def test_follow_output_gives_lines_as_printed_and_ends_with_the_sandbox(
        self, driver: SandboxDriver[Any], created: Callable[..., Awaitable[SandboxState]]
    ) -> None:
        state = await created(line="contract-follows", run_seconds=600)
        await driver.start(state.sandbox_id)
        following = driver.follow_output(state.sandbox_id)
        seen = b""
        async with asyncio.timeout(WAIT_SECONDS):
            while b"contract-follows\n" not in seen:  # printed while it runs on
                seen += await anext(following)
        await _bounded(driver.stop(state.sandbox_id, grace_seconds=1))
        async with asyncio.timeout(WAIT_SECONDS):
            rest = [chunk async for chunk in following]  # ends once the sandbox has
        assert b"contract-follows" not in b"".join(rest)  # nothing twice

    async def test_stop_ends_a_running_sandbox(
        self, driver: SandboxDriver[Any], created: Callable[..., Awaitable[SandboxState]]
    ) -> None:
        state = await created(line="x", run_seconds=600)
        await driver.start(state.sandbox_id)
        running = await driver.find(state.name)
        assert running is not None and running.status is SandboxStatus.RUNNING
        waiting = asyncio.ensure_future(driver.wait(state.sandbox_id))
        await _bounded(driver.stop(state.sandbox_id, grace_seconds=1))
        assert await _bounded(waiting) != 0  # wait returns an exit code, as for any end
        stopped = await driver.find(state.name)
        assert stopped is not None and stopped.status is SandboxStatus.EXITED
        await driver.stop(state.sandbox_id, grace_seconds=1)  # a stopped sandbox: no error

    async def test_a_second_create_of_one_name_is_sandbox_name_taken(
        self,
        driver: SandboxDriver[Any],
        make_job: JobMaker,
        created: Callable[..., Awaitable[SandboxState]],
    ) -> None:
        first = await created(line="x")
        job_id = first.name.removeprefix("sandfleet-")
        with pytest.raises(SandboxNameTaken):
            await _bounded(driver.create(self.spec(driver, make_job(job_id, line="again"))))
        same = [s for s in await driver.list_sandboxes() if s.name == first.name]
        assert [s.sandbox_id for s in same] == [first.sandbox_id]

    async def test_remove_ends_the_sandbox_and_a_second_remove_is_no_error(
        self, driver: SandboxDriver[Any], created: Callable[..., Awaitable[SandboxState]]
    ) -> None:
        state = await created(line="x", run_seconds=600)
        await driver.start(state.sandbox_id)
        await _bounded(driver.remove(state.sandbox_id))
        assert await driver.find(state.name) is None
        assert state.sandbox_id not in {s.sandbox_id for s in await driver.list_sandboxes()}
        await driver.remove(state.sandbox_id)

    async def test_an_unknown_name_is_not_found(self, driver: SandboxDriver[Any]) -> None:
        assert await driver.find(f"sandfleet-nothing-{uuid.uuid4().hex[:8]}") is None

    def test_each_gpu_has_its_own_device_name(self, driver: SandboxDriver[Any]) -> None:
        gpus = [
            Gpu(index=i, uuid=f"GPU-contract-{i}", name="", pci_bus_id=f"0000:{0x10 + i:02x}:00.0")
            for i in range(2)
        ]
        assert len({driver.device_id(gpu) for gpu in gpus}) == 2
