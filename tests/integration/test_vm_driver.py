"""The VM driver against libvirt: the test driver (real API, simulated hypervisor) for
fast checks, and real TCG boots on qemu:///system through the whole worker."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import stat
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from sandfleet.common.errors import RequestInvalid, SandboxError
from sandfleet.common.events import Phase
from sandfleet.common.models import Job, JobTemplate, ResourceRequirements
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.workers.drivers.base import (
    LABEL_GPUS,
    LABEL_JOB_ID,
    LABEL_WORKER_ID,
    ClaimedGpu,
    SandboxSpec,
    SandboxStatus,
)
from sandfleet.workers.drivers.vm.config import VmBlock
from sandfleet.workers.drivers.vm.domain_xml import METADATA_NS
from sandfleet.workers.drivers.vm.driver import STOPPED_EXIT_CODE, VmDriver
from sandfleet.workers.drivers.vm.image_files import ImagePolicy, ImageRefused
from sandfleet.workers.drivers.vm.job_files import started_at
from sandfleet.workers.gpu.claims import GpuClaimStore
from tests.support import eventually, submit_and_wait, until_phase, until_terminal
from tests.support.gpus import write_inventory
from tests.support.runtimes import GUEST_DIR, WorkerFactory

pytestmark = pytest.mark.integration


@pytest.fixture
def images_dir(vm_work_dir: Path) -> Path:
    """An image directory of the test's own, beside the test guest's."""
    path = vm_work_dir / "images"
    path.mkdir()
    return path


@pytest.fixture
async def test_driver(vm_work_dir: Path, images_dir: Path) -> AsyncIterator[VmDriver]:
    driver = VmDriver(
        uri="test:///default",
        domain_type="test",
        work_dir=vm_work_dir / "work",
        images=ImagePolicy(
            dirs=(GUEST_DIR, images_dir),
            kernel_max_bytes=64 * 2**20,
            initrd_max_bytes=64 * 2**20,
            disk_max_bytes=2**30,
        ),
        console_tail_bytes=64 * 1024,
    )
    try:
        yield driver
    finally:
        await driver.aclose()


def spec_for(
    driver: VmDriver, guest: dict[str, str], *, pci: tuple[str, ...] = (), **block: Any
) -> SandboxSpec[VmBlock]:
    job_id = f"v{uuid.uuid4().hex[:8]}"
    job = Job(
        job_id=job_id,
        driver="vm",
        resource_requirements=ResourceRequirements.model_validate(
            {"cpu": 2, "memory": "128Mi", "gpu": {"count": len(pci) or None}}
        ),
        template=JobTemplate(
            image=guest["kernel"],
            command=["true"],
            driver_config={"initrd": guest["initrd"], "gpu_device_ids": list(pci), **block},
        ),
    )
    return SandboxSpec(
        name=f"sandfleet-{job_id}",
        job_id=job_id,
        worker_id="w1",
        image=job.template.image,
        command=tuple(job.template.command),
        environment={},
        labels={LABEL_JOB_ID: job_id, LABEL_WORKER_ID: "w1"},
        cpu=2,
        memory_bytes=128 * 2**20,
        config=driver.parse_config(job),
        gpus=tuple(ClaimedGpu(f"GPU-{n}", address) for n, address in enumerate(pci)),
    )


async def test_define_inspect_metadata_and_cleanup(
    test_driver: VmDriver, vm_guest: dict[str, str], vm_work_dir: Path
) -> None:
    spec = spec_for(test_driver, vm_guest, pci=("0000:2d:00.0",))
    state = await test_driver.create(spec)
    assert state.status is SandboxStatus.CREATED
    assert state.job_id == spec.labels[LABEL_JOB_ID]
    assert state.labels[LABEL_GPUS] == "GPU-0"

    conn = libvirt.open("test:///default")
    try:
        domain = conn.lookupByUUIDString(state.sandbox_id)
        root = ET.fromstring(domain.XMLDesc())
        assert root.findtext("vcpu") == "2"
        assert root.findtext("os/kernel") == vm_guest["kernel"]
        assert root.findtext("os/initrd") == str(vm_work_dir / "work" / spec.name / "initrd.img")
        [hostdev] = root.findall("devices/hostdev")
        assert hostdev.find("source/address").get("bus") == "0x2d"  # type: ignore[union-attr]
        meta = ET.fromstring(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
        assert meta.get("id") == spec.labels[LABEL_JOB_ID]
    finally:
        conn.close()

    assert [s.name for s in await test_driver.list_sandboxes() if s.name == spec.name] == [
        spec.name
    ]
    await test_driver.remove(state.sandbox_id)
    assert await test_driver.find(spec.name) is None
    assert not (vm_work_dir / "work" / spec.name).exists()
    await test_driver.remove(state.sandbox_id)  # already gone: not an error


async def test_a_domain_undefined_after_it_was_listed_reads_as_gone(
    test_driver: VmDriver, vm_guest: dict[str, str]
) -> None:
    """Another worker may remove a domain between this one's list and inspect."""
    state = await test_driver.create(spec_for(test_driver, vm_guest))
    conn = libvirt.open("test:///default")
    try:
        listed = conn.lookupByUUIDString(state.sandbox_id)
        await test_driver.remove(state.sandbox_id)
        assert await test_driver._state_unless_gone(listed) is None
    finally:
        conn.close()


async def test_lifecycle_events_end_the_wait(
    test_driver: VmDriver, vm_guest: dict[str, str]
) -> None:
    spec = spec_for(test_driver, vm_guest)
    state = await test_driver.create(spec)
    await test_driver.start(state.sandbox_id)
    assert (await test_driver.find(spec.name)).status is SandboxStatus.RUNNING  # type: ignore[union-attr]
    # The simulated guest never reports an exit code; stopping it must end the wait, with
    # the code of a sandbox ended by its grace time running out.
    waiter = asyncio.create_task(test_driver.wait(state.sandbox_id))
    await test_driver.stop(state.sandbox_id, grace_seconds=0.1)
    assert await asyncio.wait_for(waiter, 10) == STOPPED_EXIT_CODE
    assert (await test_driver.find(spec.name)).status is SandboxStatus.EXITED  # type: ignore[union-attr]
    await test_driver.remove(state.sandbox_id)


async def test_a_guest_that_ends_without_an_exit_code_fails(
    test_driver: VmDriver, vm_guest: dict[str, str]
) -> None:
    spec = spec_for(test_driver, vm_guest)
    state = await test_driver.create(spec)
    await test_driver.start(state.sandbox_id)
    waiter = asyncio.create_task(test_driver.wait(state.sandbox_id))
    conn = libvirt.open("test:///default")
    try:
        conn.lookupByUUIDString(state.sandbox_id).destroy()  # not by the driver: it crashed
    finally:
        conn.close()
    with pytest.raises(SandboxError, match="without reporting an exit code") as failed:
        await asyncio.wait_for(waiter, 10)
    assert failed.value.reason == "GuestFailed"
    await test_driver.remove(state.sandbox_id)


async def test_a_failed_guests_console_in_the_message_is_bounded(
    test_driver: VmDriver, vm_guest: dict[str, str]
) -> None:
    state = await test_driver.create(spec := spec_for(test_driver, vm_guest))
    await test_driver.start(state.sandbox_id)
    (test_driver._dir(spec.name) / "console.log").write_bytes(b"x" * 50_000 + b"\r\n")
    waiter = asyncio.create_task(test_driver.wait(state.sandbox_id))
    conn = libvirt.open("test:///default")
    try:
        conn.lookupByUUIDString(state.sandbox_id).destroy()
    finally:
        conn.close()
    with pytest.raises(SandboxError, match="without reporting an exit code") as failed:
        await asyncio.wait_for(waiter, 10)
    assert len(str(failed.value)) < 9000
    await test_driver.remove(state.sandbox_id)


async def test_disk_is_used_through_an_overlay(
    test_driver: VmDriver, vm_guest: dict[str, str], vm_work_dir: Path, images_dir: Path
) -> None:
    base = images_dir / "base.raw"
    base.write_bytes(b"\0" * 1024 * 1024)
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    spec = spec_for(test_driver, vm_guest, disk=str(base), disk_format="raw")
    state = await test_driver.create(spec)
    overlay = vm_work_dir / "work" / spec.name / "disk.qcow2"
    assert stat.S_IMODE(overlay.stat().st_mode) == 0o600
    conn = libvirt.open("test:///default")
    try:
        root = ET.fromstring(conn.lookupByUUIDString(state.sandbox_id).XMLDesc())
        assert root.find("devices/disk/source").get("file") == str(overlay)  # type: ignore[union-attr]
    finally:
        conn.close()
    await test_driver.remove(state.sandbox_id)
    assert not overlay.exists()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before


async def test_missing_kernel_is_a_clear_failure(
    test_driver: VmDriver, vm_guest: dict[str, str], images_dir: Path
) -> None:
    spec = spec_for(test_driver, {**vm_guest, "kernel": str(images_dir / "vmlinuz")})
    with pytest.raises(ImageRefused, match=f"template.image: {images_dir}/vmlinuz is not a file"):
        await test_driver.create(spec)


async def test_host_files_outside_the_image_dirs_are_refused_by_field(
    test_driver: VmDriver, vm_guest: dict[str, str]
) -> None:
    """Before SANDFLEET_VM_IMAGE_DIRS, `disk: /etc/shadow` became the guest's /dev/vda."""
    with pytest.raises(RequestInvalid) as refused:
        spec_for(test_driver, {**vm_guest, "kernel": "/boot/vmlinuz"}, disk="/etc/shadow")
    assert [e.field for e in refused.value.errors] == [
        "template.image",
        "template.driver_config.vm.disk",
    ]
    assert all("SANDFLEET_VM_IMAGE_DIRS" in e.message for e in refused.value.errors)


@pytest.mark.parametrize(
    "field, target",
    [
        ("initrd", "/proc/self/environ"),  # the worker's environment: its broker password
        ("disk", "/etc/shadow"),
        ("kernel", "/etc/hostname"),
    ],
)
async def test_a_symlink_out_of_the_image_dirs_is_refused_and_nothing_is_made(
    test_driver: VmDriver,
    vm_guest: dict[str, str],
    vm_work_dir: Path,
    images_dir: Path,
    field: str,
    target: str,
) -> None:
    link = images_dir / f"{field}.link"
    link.symlink_to(target)
    guest = {**vm_guest, field: str(link)} if field != "disk" else vm_guest
    block: dict[str, Any] = {"disk": str(link)} if field == "disk" else {}
    spec = spec_for(test_driver, guest, **block)
    with pytest.raises(ImageRefused, match="resolves outside SANDFLEET_VM_IMAGE_DIRS") as refused:
        await test_driver.create(spec)
    assert (
        refused.value.field
        == {
            "kernel": "template.image",
            "initrd": "template.driver_config.vm.initrd",
            "disk": "template.driver_config.vm.disk",
        }[field]
    )
    assert await test_driver.find(spec.name) is None
    assert not list((vm_work_dir / "work").glob(f"{spec.name}/*.img"))


async def test_the_jobs_files_are_private(
    test_driver: VmDriver, vm_guest: dict[str, str], vm_work_dir: Path
) -> None:
    """The job's initramfs carries its environment: once world-readable."""
    spec = spec_for(test_driver, vm_guest)
    spec = SandboxSpec(**{**vars(spec), "environment": {"TOKEN": "s3cret"}})
    state = await test_driver.create(spec)
    job_dir = vm_work_dir / "work" / spec.name
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700  # test:/// has no hypervisor user
    assert stat.S_IMODE((job_dir / "initrd.img").stat().st_mode) == 0o600
    await test_driver.start(state.sandbox_id)
    assert stat.S_IMODE((job_dir / "started_at").stat().st_mode) == 0o600
    await test_driver.remove(state.sandbox_id)


async def ended_domain(driver: VmDriver, guest: dict[str, str], console: bytes) -> SandboxSpec[Any]:
    """A domain of `driver` that ran and ended with `console` on its console."""
    spec = spec_for(driver, guest)
    state = await driver.create(spec)
    await driver.start(state.sandbox_id)
    await driver.stop(state.sandbox_id, grace_seconds=0)
    (driver._dir(spec.name) / "console.log").write_bytes(console)
    return spec


async def test_a_hostile_exit_marker_never_breaks_listing(
    test_driver: VmDriver, vm_guest: dict[str, str]
) -> None:
    """A guest that printed an exit marker of thousands of digits (int() refuses over
    4,300) once made every listing of the host's domains raise: reconciliation stopped
    and the worker could not start. (Within the console tail the driver reads.)"""
    hostile = b"SANDFLEET_BEGIN\r\nSANDFLEET_EXIT=" + b"9" * 5000 + b"\r\n"
    bad = await ended_domain(test_driver, vm_guest, hostile)
    good = await ended_domain(test_driver, vm_guest, b"SANDFLEET_EXIT=3\r\n")
    listed = {s.name: s for s in await test_driver.list_sandboxes()}
    assert (listed[bad.name].status, listed[bad.name].exit_code) == (SandboxStatus.EXITED, None)
    assert listed[good.name].exit_code == 3
    for spec in (bad, good):
        await test_driver.remove(listed[spec.name].sandbox_id)


async def test_a_domain_that_cannot_be_read_is_listed_as_running(
    test_driver: VmDriver, vm_guest: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong reading one domain, the others are listed, and that one
    keeps its job's GPUs (counted as running under the job its name gives)."""
    bad = await ended_domain(test_driver, vm_guest, b"")
    good = await ended_domain(test_driver, vm_guest, b"SANDFLEET_EXIT=0\r\n")

    def failing_for_bad(job_dir: Path) -> Any:
        if job_dir.name == bad.name:
            raise RuntimeError("unreadable")
        return started_at(job_dir)

    monkeypatch.setattr("sandfleet.workers.drivers.vm.domains.started_at", failing_for_bad)
    listed = {s.name: s for s in await test_driver.list_sandboxes()}
    assert (listed[bad.name].status, listed[bad.name].job_id) == (
        SandboxStatus.RUNNING,
        bad.job_id,
    )
    assert listed[good.name].status is SandboxStatus.EXITED
    monkeypatch.undo()
    for spec in (bad, good):
        await test_driver.remove(listed[spec.name].sandbox_id)


def vm_request(guest: dict[str, str], script: str, **extra: Any) -> dict[str, Any]:
    block = {"initrd": guest["initrd"], **extra.pop("block", {})}
    return {
        "job_id": f"vm-{uuid.uuid4().hex[:8]}",
        "driver": "vm",
        "template": {
            "image": guest["kernel"],
            "command": ["sh", "-c", script],
            "driver_config": {"vm": block},
            **extra.pop("template", {}),
        },
        **extra,
    }


async def guest_printed(console: Path, line: str) -> bool:
    """Whether the guest's job has printed `line` (its console log is the driver's file)."""
    try:
        text = await asyncio.to_thread(console.read_text, errors="replace")
    except FileNotFoundError:
        return False
    return f"\n{line}\n" in text  # read_text reads the console's \r\n as \n


def domain_exists(name: str) -> bool:
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
    return True


async def test_real_boot_reports_exit_code_and_output(
    client: Client, vm_worker: WorkerFactory, vm_guest: dict[str, str]
) -> None:
    req = vm_request(
        vm_guest,
        'echo hi; echo "$GREETING"; exit 3',
        template={"environment": {"GREETING": "from a VM"}},
    )
    async with vm_worker():
        events = await submit_and_wait(client, req, timeout=120)
    assert [e.phase for e in events] == [
        Phase.ACCEPTED,
        Phase.STARTING,
        Phase.RUNNING,
        Phase.FAILED,
    ]
    assert events[-1].exit_code == 3
    assert events[-1].output == "hi\nfrom a VM\n"
    assert not domain_exists(f"sandfleet-{req['job_id']}")


async def test_real_boot_timeout_destroys_the_domain(
    client: Client, vm_worker: WorkerFactory, vm_guest: dict[str, str], vm_work_dir: Path
) -> None:
    req = vm_request(vm_guest, "echo sleeping; sleep 600", template={"timeout_seconds": 3})
    async with vm_worker():
        events = await submit_and_wait(client, req, timeout=120)
    assert events[-1].phase is Phase.TIMED_OUT
    assert not domain_exists(f"sandfleet-{req['job_id']}")
    assert not (vm_work_dir / f"sandfleet-{req['job_id']}").exists()


async def test_gpu_vm_job_fails_with_the_passthrough_reason_and_frees_its_claim(
    settings: Settings,
    client: Client,
    vm_worker: WorkerFactory,
    vm_guest: dict[str, str],
    tmp_path: Path,
) -> None:
    inventory = write_inventory(tmp_path / "gpus.json")
    req = vm_request(
        vm_guest, "true",
        block={"gpu_device_ids": ["00000000:2b:00.0"]},
        resource_requirements={"gpu": {"count": 1}},
    )  # fmt: skip
    async with vm_worker(gpu_inventory=inventory):
        events = await submit_and_wait(client, req, timeout=120)
    claimed = next(e for e in events if e.phase is Phase.CLAIMED)
    assert claimed.gpus == ["0000:2b:00.0"]
    assert events[-1].phase is Phase.FAILED
    assert "host doesn't support passthrough of host PCI devices" in events[-1].message
    assert GpuClaimStore(settings.state_dir).claims() == []
    assert not domain_exists(f"sandfleet-{req['job_id']}")


async def test_cancelling_a_running_vm_job_ends_it_cancelled(
    client: Client, vm_worker: WorkerFactory, vm_guest: dict[str, str], vm_work_dir: Path
) -> None:
    req = vm_request(vm_guest, "echo up; sleep 600")
    job_id = req["job_id"]
    async with vm_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(req)).accepted
        await until_phase(stream, job_id, Phase.RUNNING, timeout=120)
        console = vm_work_dir / f"sandfleet-{job_id}" / "console.log"
        await eventually(lambda: guest_printed(console, "up"), timeout=120)
        modes = {
            p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid)
            for p in (console.parent, console.parent / "initrd.img")
        }
        await client.cancel(job_id)
        events = await until_terminal(stream, job_id, timeout=120)
    assert (events[-1].phase, events[-1].reason) == (Phase.CANCELLED, "Cancelled")
    # Private: QEMU's group (libvirt-qemu here) may only pass through to the files
    # libvirt hands QEMU while the guest runs; the initramfs (with the environment) is 0600.
    hypervisor_gid = grp.getgrnam("libvirt-qemu").gr_gid
    assert modes == {
        f"sandfleet-{job_id}": (0o710, hypervisor_gid),
        "initrd.img": (0o600, hypervisor_gid),
    }
    assert not domain_exists(f"sandfleet-{job_id}")
    assert not (vm_work_dir / f"sandfleet-{job_id}").exists()
