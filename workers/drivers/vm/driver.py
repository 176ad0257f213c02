"""Virtual-machine sandboxes through libvirt. libvirtError never leaves this module.

A job's domain is `sandfleet-<job_id>`, defined persistently with the job id, its
worker and its GPUs in `<metadata>` (so a restarted worker can adopt or clean it up),
booted directly from a kernel and an initramfs that carries the job (see guest.py),
and destroyed when the guest powers off. Its files (the job's initramfs, the disk
overlay, the serial console log) live in `<vm_work_dir>/<domain name>/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from sandfleet.common.errors import ImageUnavailable, SandboxError, SandboxNameTaken
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
from sandfleet.workers.drivers.vm.domain_xml import (
    METADATA_NS,
    DomainPlan,
    domain_xml,
    parse_metadata,
)
from sandfleet.workers.drivers.vm.guest import exit_code, job_archive, job_output
from sandfleet.workers.drivers.vm.libvirt_loop import StopWatcher, libvirt_loop
from sandfleet.workers.gpu.inventory import Gpu

NAME_PREFIX = "sandfleet-"
# What `wait` returns for a guest that `stop` ended before it reported its own exit
# code: as for a container killed after its grace time (128 + SIGKILL).
STOPPED_EXIT_CODE = 137


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

    def __init__(self, *, uri: str, domain_type: str, work_dir: Path) -> None:
        self._uri = uri
        self._domain_type = domain_type
        self._work_dir = work_dir
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
        return parse_vm_block(job)

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
        initrd = await asyncio.to_thread(self._prepare_files, spec, work)
        disk = await self._overlay(work, block) if block.disk else None
        plan = DomainPlan(
            name=spec.name,
            domain_type=self._domain_type,
            job_id=spec.job_id,
            worker_id=spec.worker_id,
            gpus=tuple(gpu.uuid for gpu in spec.gpus),
            pci_devices=spec.gpu_devices,
            cpu=spec.cpu,
            memory_bytes=spec.memory_bytes,
            kernel=spec.image,
            initrd=initrd,
            cmdline=block.cmdline,
            console_log=work / "console.log",
            disk=disk,
            disk_format=block.disk_format,
        )
        conn = await self._connection()
        async with _translated("define", spec.name):
            domain = await self._libvirt.call(conn.defineXML, domain_xml(plan))
        return await self._state(domain)

    @staticmethod
    def _prepare_files(spec: SandboxSpec[VmBlock], work: Path) -> Path:
        """Check the boot files exist; write the job's initramfs. Returns its path."""
        block = spec.config
        for what, path in (("kernel", spec.image), ("initrd", block.initrd), ("disk", block.disk)):
            if path is not None and not Path(path).is_file():
                raise ImageUnavailable(f"the guest {what} {path} is not a file on this host")
        shutil.rmtree(work, ignore_errors=True)  # nothing of an earlier domain of this name
        work.mkdir(parents=True)
        work.chmod(0o755)  # the hypervisor runs as its own user and writes the console log here
        initrd = work / "initrd.img"
        job = job_archive(spec.command, spec.environment) if spec.command else b""
        initrd.write_bytes(Path(block.initrd).read_bytes() + job)
        initrd.chmod(0o644)
        return initrd

    async def _overlay(self, work: Path, block: VmBlock) -> Path:
        """A copy-on-write overlay, so the base image is never written."""
        overlay = work / "disk.qcow2"
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", block.disk_format,
            "-b", str(block.disk), str(overlay),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise SandboxError(f"qemu-img create overlay of {block.disk}: {out.decode().strip()}")
        return overlay

    async def _domain(self, sandbox_id: str) -> libvirt.virDomain:
        conn = await self._connection()
        async with _translated("lookup", sandbox_id):
            return await self._libvirt.call(conn.lookupByUUIDString, sandbox_id)

    async def start(self, sandbox_id: str) -> None:
        domain = await self._domain(sandbox_id)
        (self._dir(domain.name()) / "started_at").write_text(datetime.now(UTC).isoformat())
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
        console = self._console(domain.name())
        code = exit_code(console)
        if code is None and sandbox_id in self._stopped:
            return STOPPED_EXIT_CODE
        if code is None:
            tail = job_output(console, lines=20).strip() or "(no console output)"
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
        states = [
            await self._state_unless_gone(d) for d in domains if d.name().startswith(NAME_PREFIX)
        ]
        return [s for s in states if s is not None and s.job_id]

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
        return job_output(self._console(domain.name()), lines=lines)

    def _console(self, name: str) -> str:
        try:
            return (self._dir(name) / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def _state(self, domain: libvirt.virDomain) -> SandboxState:
        name = domain.name()
        async with _translated("inspect", name):
            active = await self._libvirt.call(domain.isActive)
            try:
                metadata = await self._libvirt.call(
                    domain.metadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS
                )
            except libvirt.libvirtError:
                metadata = None  # not ours
        labels = {LABEL_DRIVER: self.name}
        if metadata:
            meta = parse_metadata(metadata)
            labels |= {
                LABEL_JOB_ID: meta.get("id", ""),
                LABEL_WORKER_ID: meta.get("worker", ""),
                LABEL_GPUS: meta.get("gpus", ""),
            }
        started_file = self._dir(name) / "started_at"
        started_at = (
            datetime.fromisoformat(started_file.read_text()) if started_file.exists() else None
        )
        if active:
            status = SandboxStatus.RUNNING
        elif started_at is not None:
            status = SandboxStatus.EXITED
        else:
            status = SandboxStatus.CREATED
        return SandboxState(
            sandbox_id=domain.UUIDString(),
            name=name,
            status=status,
            exit_code=exit_code(self._console(name)) if status is SandboxStatus.EXITED else None,
            started_at=started_at,
            labels=labels,
        )
