"""Virtual-machine sandboxes through libvirt. libvirtError never leaves this module.

A job's domain is `sandfleet-<job_id>`, defined persistently with the job id, its
worker and its GPUs in `<metadata>` (so a restarted worker can adopt or clean it up),
booted directly from a kernel and an initramfs that carries the job (see guest.py),
and destroyed when the guest powers off. Its boot files come only from the image
directories (image_files.py); its own files (the job's initramfs, the disk overlay, the
serial console log) live, private, in `<vm_work_dir>/<domain name>/` (job_files.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import libvirt

from sandfleet.common.errors import SandboxError, SandboxNameTaken
from sandfleet.common.events import bounded_output
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_GPUS,
    LABEL_JOB_ID,
    LABEL_WORKER_ID,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
)
from sandfleet.workers.drivers.errors import error_translator
from sandfleet.workers.drivers.vm.config import VmBlock, parse_vm_block
from sandfleet.workers.drivers.vm.console_follow import follow_console
from sandfleet.workers.drivers.vm.domain_xml import (
    METADATA_NS,
    DomainPlan,
    dac_group,
    domain_xml,
    parse_metadata,
)
from sandfleet.workers.drivers.vm.guest import exit_code, job_archive, job_output
from sandfleet.workers.drivers.vm.image_files import (
    DISK_FIELD,
    INITRD_FIELD,
    KERNEL_FIELD,
    ImagePolicy,
    check_image,
    read_image,
)
from sandfleet.workers.drivers.vm.job_files import (
    CONSOLE_LOG,
    DISK_OVERLAY,
    INITRD,
    console_tail,
    make_private_dir,
    record_started,
    started_at,
    write_private,
)
from sandfleet.workers.drivers.vm.libvirt_loop import StopWatcher, libvirt_loop
from sandfleet.workers.gpu.inventory import Gpu

NAME_PREFIX = "sandfleet-"
# What `wait` returns for a guest that `stop` ended before it reported its own exit
# code: as for a container killed after its grace time (128 + SIGKILL).
STOPPED_EXIT_CODE = 137

log = logging.getLogger(__name__)


class _BootFiles(NamedTuple):
    kernel: Path  # the checked files' real paths
    initrd: Path  # the job's own initramfs
    disk: Path | None


_translated = error_translator(
    "libvirt",
    libvirt.libvirtError,
    lambda exc: exc.get_error_message(),
)


def _missing_domain(exc: libvirt.libvirtError) -> bool:
    return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


class VmDriver:
    """Whether the host can pass PCI devices through shows when a domain starts;
    libvirt's own reason then reaches the job's failed event."""

    name = "vm"

    def __init__(
        self,
        *,
        uri: str,
        domain_type: str,
        work_dir: Path,
        images: ImagePolicy,
        console_tail_bytes: int,
    ) -> None:
        self._uri = uri
        self._domain_type = domain_type
        self._work_dir = work_dir
        self._images = images
        self._console_tail_bytes = console_tail_bytes
        self._hypervisor_group: str | None = None  # read from libvirt with the connection
        self._libvirt = libvirt_loop()
        self._watcher = StopWatcher()
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._opening = asyncio.Lock()
        self._stopped: set[str] = set()  # domains this driver stopped while they ran

    async def _connection(self) -> libvirt.virConnect:
        async with self._opening:
            if self._conn is None:
                async with _translated("connect", self._uri):
                    conn = await self._libvirt.call(libvirt.open, self._uri)
                    self._callback_id = await self._libvirt.call(
                        conn.domainEventRegisterAny,
                        None,
                        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                        self._watcher.on_event,
                        None,
                    )
                    capabilities = await self._libvirt.call(conn.getCapabilities)
                self._hypervisor_group = dac_group(capabilities, self._domain_type)
                self._conn = conn
            return self._conn

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(libvirt.libvirtError):
                if self._callback_id is not None:
                    await self._libvirt.call(conn.domainEventDeregisterAny, self._callback_id)
                await self._libvirt.call(conn.close)

    def parse_config(self, job: Job) -> VmBlock:
        return parse_vm_block(job, self._images)

    def device_id(self, gpu: Gpu) -> str:
        return gpu.pci_bus_id

    def _dir(self, name: str) -> Path:
        return self._work_dir / name

    async def create(self, spec: SandboxSpec[VmBlock]) -> SandboxState:
        # Checked before the work directory is cleared: it may be that domain's.
        if await self.find(spec.name) is not None:
            raise SandboxNameTaken(f"libvirt define {spec.name}: a domain of that name exists")
        block = spec.config
        work = self._dir(spec.name)
        conn = await self._connection()  # first: it knows the hypervisor's group
        try:
            boot = await asyncio.to_thread(self._prepare_files, spec, work)
        except OSError as exc:
            raise SandboxError(f"preparing the guest's files in {work}: {exc}") from exc
        disk = await self._overlay(work, boot.disk, block.disk_format) if boot.disk else None
        plan = DomainPlan(
            name=spec.name,
            domain_type=self._domain_type,
            job_id=spec.job_id,
            worker_id=spec.worker_id,
            gpus=tuple(gpu.uuid for gpu in spec.gpus),
            pci_devices=spec.gpu_devices,
            cpu=spec.cpu,
            memory_bytes=spec.memory_bytes,
            kernel=str(boot.kernel),
            initrd=boot.initrd,
            cmdline=block.cmdline,
            console_log=work / CONSOLE_LOG,
            disk=disk,
            disk_format=block.disk_format,
        )
        async with _translated("define", spec.name):
            domain = await self._libvirt.call(conn.defineXML, domain_xml(plan))
        return await self._state(domain)

    def _prepare_files(self, spec: SandboxSpec[VmBlock], work: Path) -> _BootFiles:
        """Check every boot file (ImageRefused naming its field), then write the job's
        initramfs in a fresh private directory."""
        block = spec.config
        kernel = check_image(self._images, KERNEL_FIELD, spec.image)
        disk = check_image(self._images, DISK_FIELD, block.disk) if block.disk else None
        base_initrd = read_image(self._images, INITRD_FIELD, block.initrd)
        job = job_archive(spec.command, spec.environment) if spec.command else b""
        make_private_dir(work, hypervisor_group=self._hypervisor_group)
        write_private(work / INITRD, base_initrd + job)
        return _BootFiles(kernel=kernel, initrd=work / INITRD, disk=disk)

    async def _overlay(self, work: Path, base: Path, base_format: str) -> Path:
        """A copy-on-write overlay of the checked base, so the base is never written."""
        overlay = work / DISK_OVERLAY
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format,
            "-b", str(base), str(overlay),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            umask=0o077,  # the overlay holds what the guest writes: 0600, as the job's own
        )  # fmt: skip
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise SandboxError(f"qemu-img create overlay of {base}: {out.decode().strip()}")
        return overlay

    async def _domain(self, sandbox_id: str) -> libvirt.virDomain:
        conn = await self._connection()
        async with _translated("lookup", sandbox_id):
            return await self._libvirt.call(conn.lookupByUUIDString, sandbox_id)

    async def start(self, sandbox_id: str) -> None:
        domain = await self._domain(sandbox_id)
        await asyncio.to_thread(record_started, self._dir(domain.name()))
        async with _translated("start", domain.name()):
            await self._libvirt.call(domain.create)

    async def wait(self, sandbox_id: str) -> int:
        domain = await self._domain(sandbox_id)
        stopped = self._watcher.watch(sandbox_id)
        try:
            # Registered first, checked second: a stop in between is not missed.
            if await self._libvirt.call(domain.isActive):
                await stopped
        finally:
            self._watcher.forget(sandbox_id, stopped)
        console = await self._console(domain.name())
        code = exit_code(console)
        if code is None and sandbox_id in self._stopped:
            return STOPPED_EXIT_CODE
        if code is None:
            # The guest wrote it: as much of it as any job's output, and no more.
            tail = bounded_output(job_output(console, lines=20).strip()) or "(no console output)"
            raise SandboxError(
                f"the guest stopped without reporting an exit code; console: {tail}",
                reason="GuestFailed",
            )
        return code

    async def stop(self, sandbox_id: str, *, grace_seconds: float) -> None:
        domain = await self._domain(sandbox_id)
        stopped = self._watcher.watch(sandbox_id)
        try:
            if not await self._libvirt.call(domain.isActive):
                return
            self._stopped.add(sandbox_id)
            with contextlib.suppress(libvirt.libvirtError):
                await self._libvirt.call(domain.shutdown)  # ACPI; a guest may ignore it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_seconds):
                    await stopped
        finally:
            self._watcher.forget(sandbox_id, stopped)
        with contextlib.suppress(libvirt.libvirtError):
            await self._libvirt.call(domain.destroy)

    async def remove(self, sandbox_id: str) -> None:
        conn = await self._connection()
        try:
            domain = await self._libvirt.call(conn.lookupByUUIDString, sandbox_id)
        except libvirt.libvirtError as exc:
            if _missing_domain(exc):
                return
            raise SandboxError(f"libvirt lookup {sandbox_id}: {exc.get_error_message()}") from exc
        name = domain.name()
        self._stopped.discard(sandbox_id)
        async with _translated("remove", name):
            if await self._libvirt.call(domain.isActive):
                await self._libvirt.call(domain.destroy)
            await self._libvirt.call(domain.undefine)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    async def find(self, name: str) -> SandboxState | None:
        conn = await self._connection()
        try:
            domain = await self._libvirt.call(conn.lookupByName, name)
        except libvirt.libvirtError as exc:
            if _missing_domain(exc):
                return None
            raise SandboxError(f"libvirt lookup {name}: {exc.get_error_message()}") from exc
        return await self._state_unless_gone(domain)

    async def list_sandboxes(self) -> list[SandboxState]:
        conn = await self._connection()
        async with _translated("list", "domains"):
            domains = await self._libvirt.call(conn.listAllDomains, 0)
        states = [await self._listed_state(d) for d in domains if d.name().startswith(NAME_PREFIX)]
        return [s for s in states if s is not None and s.job_id]

    async def _listed_state(self, domain: libvirt.virDomain) -> SandboxState | None:
        """A listed domain's state. One that cannot be read (whatever its guest did to
        its files, whatever libvirt says of it) is logged and counted as running under
        the job its name gives: its GPUs stay claimed, and the rest are still listed."""
        name = domain.name()
        try:
            return await self._state_unless_gone(domain)
        except Exception as exc:
            log.warning("domain %s: its state cannot be read (%r); counted as running", name, exc)
            return SandboxState(
                sandbox_id=domain.UUIDString(),
                name=name,
                status=SandboxStatus.RUNNING,
                exit_code=None,
                started_at=None,
                labels={LABEL_DRIVER: self.name, LABEL_JOB_ID: name.removeprefix(NAME_PREFIX)},
            )

    async def _state_unless_gone(self, domain: libvirt.virDomain) -> SandboxState | None:
        """The domain's state, or None if it was undefined since it was looked up
        (another worker removing it is no error of ours)."""
        try:
            return await self._state(domain)
        except SandboxError as exc:
            cause = exc.__cause__
            if isinstance(cause, libvirt.libvirtError) and _missing_domain(cause):
                return None
            raise

    async def output(self, sandbox_id: str, *, lines: int) -> str:
        domain = await self._domain(sandbox_id)
        return job_output(await self._console(domain.name()), lines=lines)

    async def follow_output(self, sandbox_id: str) -> AsyncIterator[bytes]:
        domain = await self._domain(sandbox_id)
        console = self._dir(domain.name()) / CONSOLE_LOG

        async def running() -> bool:
            return bool(await self._libvirt.call(domain.isActive))

        async for chunk in follow_console(console, running):
            yield chunk

    async def _console(self, name: str) -> str:
        return await asyncio.to_thread(console_tail, self._dir(name), self._console_tail_bytes)

    async def _state(self, domain: libvirt.virDomain) -> SandboxState:
        name = domain.name()
        async with _translated("inspect", name):
            active = await self._libvirt.call(domain.isActive)
            labels = await self._labels(domain)
        was_started, started = await asyncio.to_thread(started_at, self._dir(name))
        if active:
            status = SandboxStatus.RUNNING
        elif was_started:
            status = SandboxStatus.EXITED
        else:
            status = SandboxStatus.CREATED
        code = exit_code(await self._console(name)) if status is SandboxStatus.EXITED else None
        return SandboxState(
            sandbox_id=domain.UUIDString(),
            name=name,
            status=status,
            exit_code=code,
            started_at=started,
            labels=labels,
        )

    async def _labels(self, domain: libvirt.virDomain) -> dict[str, str]:
        """The job's labels from the domain's metadata; only the driver's if it has none."""
        labels = {LABEL_DRIVER: self.name}
        try:
            metadata = await self._libvirt.call(
                domain.metadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS
            )
            meta = parse_metadata(metadata)
        except (libvirt.libvirtError, ET.ParseError):
            return labels  # not ours
        return labels | {
            LABEL_JOB_ID: meta.get("id", ""),
            LABEL_WORKER_ID: meta.get("worker", ""),
            LABEL_GPUS: meta.get("gpus", ""),
        }
