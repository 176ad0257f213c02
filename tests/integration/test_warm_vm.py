"""Warm guests of the VM driver on qemu:///system (QEMU/TCG): booted ahead of their
job, waiting on their virtio-serial channel, taken by a job (see the driver's README).
Each boot takes seconds under TCG, so each test boots as few guests as it can."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest

from sandfleet.common.errors import SandboxError, SandboxNameTaken
from sandfleet.common.models import Job, JobTemplate, ResourceRequirements
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_POOL,
    LABEL_WORKER_ID,
    WARM_NAME_PREFIX,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    WarmSandboxes,
    WarmSpec,
    sandbox_name,
)
from sandfleet.workers.drivers.vm.config import VmBlock
from sandfleet.workers.drivers.vm.driver import STOPPED_EXIT_CODE, VmDriver
from sandfleet.workers.drivers.vm.image_files import ImagePolicy
from tests.support.runtimes import GUEST_DIR

pytestmark = pytest.mark.integration

POOL = "vm-test-pool"
BOOT_SECONDS = 120  # a TCG boot on a busy machine, with room to spare


def make_driver(work_dir: Path) -> VmDriver:
    return VmDriver(
        uri="qemu:///system",
        domain_type="qemu",  # TCG: nested KVM guests hang here
        work_dir=work_dir,
        images=ImagePolicy(
            dirs=(GUEST_DIR,),
            kernel_max_bytes=64 * 2**20,
            initrd_max_bytes=64 * 2**20,
            disk_max_bytes=2**30,
        ),
        console_tail_bytes=64 * 1024,
    )


@pytest.fixture
async def driver(vm_work_dir: Path, vm_guest: dict[str, str]) -> AsyncIterator[VmDriver]:
    """A VM driver whose domains (this test's, by their worker id) go when the test ends."""
    vm = make_driver(vm_work_dir / "work")
    try:
        yield vm
    finally:
        await remove_all(vm, vm_work_dir / "work")


async def remove_all(vm: VmDriver, work_dir: Path) -> None:
    mine = [s for s in await vm.list_sandboxes() if (work_dir / s.name).exists()]
    for state in mine:
        await vm.remove(state.sandbox_id)
    await vm.aclose()


def block(vm: VmDriver, guest: dict[str, str]) -> VmBlock:
    return vm.parse_config(job_for(guest, ["true"]))


def job_for(guest: dict[str, str], command: list[str], **template: object) -> Job:
    return Job(
        job_id=f"w{uuid.uuid4().hex[:8]}",
        driver="vm",
        resource_requirements=ResourceRequirements(cpu=1, memory=128 * 2**20),
        template=JobTemplate.model_validate(
            {
                "image": guest["kernel"],
                "command": command,
                "driver_config": {"initrd": guest["initrd"]},
                **template,
            }
        ),
    )


def warm_spec(vm: VmDriver, guest: dict[str, str]) -> WarmSpec[VmBlock]:
    return WarmSpec(
        name=f"{WARM_NAME_PREFIX}{uuid.uuid4().hex[:8]}",
        worker_id="w1",
        pool=POOL,
        image=guest["kernel"],
        cpu=1,
        memory_bytes=128 * 2**20,
        config=block(vm, guest),
        labels={LABEL_DRIVER: "vm", LABEL_WORKER_ID: "w1", LABEL_POOL: POOL},
    )


def job_spec(vm: VmDriver, job: Job) -> SandboxSpec[VmBlock]:
    return SandboxSpec.for_job(job, vm.parse_config(job), driver="vm", worker_id="w1")


async def create_warm(vm: VmDriver, guest: dict[str, str]) -> SandboxState:
    return await asyncio.wait_for(vm.create_warm(warm_spec(vm, guest)), BOOT_SECONDS)


def domain_exists(name: str) -> bool:
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
    return True


async def test_a_taken_warm_guest_runs_the_job_as_its_own(
    driver: VmDriver, vm_guest: dict[str, str], vm_work_dir: Path
) -> None:
    assert isinstance(driver, WarmSandboxes)
    first, second = await asyncio.gather(
        create_warm(driver, vm_guest), create_warm(driver, vm_guest)
    )
    waiting = {s.sandbox_id: s for s in await driver.list_sandboxes()}
    for warm in (first, second):
        assert waiting[warm.sandbox_id].status is SandboxStatus.RUNNING
        assert waiting[warm.sandbox_id].labels[LABEL_POOL] == POOL
        assert waiting[warm.sandbox_id].job_id is None

    value = "line one\nline $two 'three'"
    job = job_for(
        vm_guest,
        # Long enough to be running still when the take returns at its begin marker (a
        # job ending at once was once past its exit marker when the state was read).
        ["sh", "-c", 'printf "%s\\n" "$VALUE"; sleep 3; exit 7'],
        environment={"VALUE": value},
        labels={"team": "warm"},
    )
    before_take = datetime.now(UTC)
    taken = await asyncio.wait_for(driver.take_warm(first.sandbox_id, job_spec(driver, job)), 60)
    assert taken.status is SandboxStatus.RUNNING
    assert taken.started_at is not None and taken.started_at >= before_take

    found = await driver.find(sandbox_name(job.job_id))
    assert found is not None
    assert (found.sandbox_id, found.job_id, found.labels["team"]) == (
        first.sandbox_id,
        job.job_id,
        "warm",
    )
    listed = {s.sandbox_id: s for s in await driver.list_sandboxes()}
    assert listed[first.sandbox_id].job_id == job.job_id
    assert listed[second.sandbox_id].job_id is None  # the other still waits for a job

    # A second take of the same job's name is refused, and takes nothing.
    with pytest.raises(SandboxNameTaken):
        await driver.take_warm(second.sandbox_id, job_spec(driver, job))

    assert await asyncio.wait_for(driver.wait(first.sandbox_id), 60) == 7
    assert await driver.output(first.sandbox_id, lines=50) == value + "\n"
    await driver.remove(first.sandbox_id)

    await driver.remove(second.sandbox_id)  # never taken
    assert not domain_exists(second.name)
    assert not (vm_work_dir / "work" / second.name).exists()
    assert await driver.find(sandbox_name(job.job_id)) is None


async def test_stopping_a_taken_warm_guest_ends_it(
    driver: VmDriver, vm_guest: dict[str, str]
) -> None:
    warm = await create_warm(driver, vm_guest)
    job = job_for(vm_guest, ["sh", "-c", "echo up; sleep 600"])
    await asyncio.wait_for(driver.take_warm(warm.sandbox_id, job_spec(driver, job)), 60)
    waiter = asyncio.create_task(driver.wait(warm.sandbox_id))
    await driver.stop(warm.sandbox_id, grace_seconds=1)
    assert await asyncio.wait_for(waiter, 30) == STOPPED_EXIT_CODE
    state = await driver.find(sandbox_name(job.job_id))
    assert state is not None and state.status is SandboxStatus.EXITED
    assert await driver.output(warm.sandbox_id, lines=50) == "up\n"


async def test_a_warm_guest_whose_driver_is_gone_never_runs_a_job(
    vm_work_dir: Path, vm_guest: dict[str, str]
) -> None:
    """Its worker's process ended (here: its driver closed): the guest gives up and
    powers off by itself; the successor lists it as no job's and removes it."""
    first = make_driver(vm_work_dir / "work")
    warm = await create_warm(first, vm_guest)
    await first.aclose()
    successor = make_driver(vm_work_dir / "work")
    try:
        job = job_for(vm_guest, ["true"])
        with pytest.raises(SandboxError, match="no guest of this driver waiting"):
            await successor.take_warm(warm.sandbox_id, job_spec(successor, job))
        with pytest.raises(SandboxError, match="without reporting an exit code"):
            await asyncio.wait_for(successor.wait(warm.sandbox_id), BOOT_SECONDS)
        assert "no job arrived" in await successor.output(warm.sandbox_id, lines=5)
        [listed] = [s for s in await successor.list_sandboxes() if s.name == warm.name]
        assert (listed.job_id, listed.labels[LABEL_POOL]) == (None, POOL)
        await successor.remove(listed.sandbox_id)
        assert not domain_exists(warm.name)
    finally:
        await remove_all(successor, vm_work_dir / "work")


async def test_a_cold_start_returns_once_the_command_started(
    driver: VmDriver, vm_guest: dict[str, str], vm_work_dir: Path
) -> None:
    """The runtime says `running` when `start` returns: the boot is `starting`."""
    spec = job_spec(driver, job_for(vm_guest, ["sleep", "600"]))
    state = await driver.create(spec)
    await asyncio.wait_for(driver.start(state.sandbox_id), BOOT_SECONDS)
    console = (vm_work_dir / "work" / spec.name / "console.log").read_bytes()
    assert b"\nSANDFLEET_BEGIN\r\n" in b"\n" + console
    await driver.stop(state.sandbox_id, grace_seconds=0)
