"""Virtual-machine sandboxes through libvirt. libvirtError never leaves this module
(and domains.py, which reads what the domains are).

A job's domain is `sandfleet-<job_id>`, defined persistently with the job id, its
worker and its GPUs in `<metadata>` (so a restarted worker can adopt or clean it up),
booted directly from a kernel and an initramfs that carries the job (see guest.py),
and destroyed when the guest powers off. Its boot files come only from the image
directories (image_files.py); its own files (the job's initramfs, the disk overlay, the
serial console log) live, private, in `<vm_work_dir>/<domain name>/` (job_files.py).

A warm guest is booted before its job is known, under a warm name, and waits for the
job on its job channel (job_channel.py); a job takes it by becoming its metadata's
owner and sending the job down the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from sandfleet.common.errors import SandboxError, SandboxNameTaken
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import LABEL_POOL, SandboxSpec, SandboxState, WarmSpec
from sandfleet.workers.drivers.vm.boot_files import BootFiles, make_boot_files
from sandfleet.workers.drivers.vm.config import VmBlock, parse_vm_block
from sandfleet.workers.drivers.vm.console_follow import wait_for_exit_marker
from sandfleet.workers.drivers.vm.domain_xml import (
    METADATA_NS,
    METADATA_PREFIX,
    DomainOwner,
    DomainPlan,
    domain_xml,
    metadata_element,
    metadata_xml,
)
from sandfleet.workers.drivers.vm.domains import LibvirtDomains, missing_domain, translated
from sandfleet.workers.drivers.vm.guest import (
    BEGIN_MARKER,
    WAITING_MARKER,
    exit_code,
    job_archive,
    job_frame,
)
from sandfleet.workers.drivers.vm.image_files import ImagePolicy
from sandfleet.workers.drivers.vm.job_channel import JobChannels
from sandfleet.workers.drivers.vm.job_files import CONSOLE_LOG, JOB_CHANNEL, record_started
from sandfleet.workers.drivers.vm.plugin import BOOT_TIMEOUT_SECONDS
from sandfleet.workers.gpu.inventory import Gpu

log = logging.getLogger(__name__)

# What `wait` returns for a guest that `stop` ended before it reported its own exit
# code: as for a container killed after its grace time (128 + SIGKILL).
STOPPED_EXIT_CODE = 137


class VmDriver(LibvirtDomains):
    """Whether the host can pass PCI devices through shows when a domain starts;
    libvirt's own reason then reaches the job's failed event."""

    def __init__(
        self,
        *,
        uri: str,
        domain_type: str,
        work_dir: Path,
        images: ImagePolicy,
        console_tail_bytes: int,
        boot_timeout_seconds: float = BOOT_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(
            uri=uri,
            domain_type=domain_type,
            work_dir=work_dir,
            console_tail_bytes=console_tail_bytes,
            boot_timeout_seconds=boot_timeout_seconds,
        )
        self._images = images
        self._channels = JobChannels()
        self._stopped: set[str] = set()  # domains this driver stopped while they ran

    async def aclose(self) -> None:
        await self._channels.aclose()  # its waiting guests give up and power off
        await super().aclose()

    def parse_config(self, job: Job) -> VmBlock:
        return parse_vm_block(job, self._images)

    def device_id(self, gpu: Gpu) -> str:
        return gpu.pci_bus_id

    async def create(self, spec: SandboxSpec[VmBlock]) -> SandboxState:
        await self._refuse_taken_name(spec.name)
        job = job_archive(spec.command, spec.environment) if spec.command else b""
        work = self._dir(spec.name)
        boot = await self._boot_files(spec.image, spec.config, job, work)
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
            cmdline=spec.config.cmdline,
            console_log=work / CONSOLE_LOG,
            disk=boot.disk,
            disk_format=spec.config.disk_format,
            labels=spec.labels,
        )
        return await self._state(await self._define(plan))

    async def create_warm(self, spec: WarmSpec[VmBlock]) -> SandboxState:
        """Boot a guest of the profile's kernel, initramfs, vCPUs and memory that waits
        for its job on its channel; return once it says it waits (it is removed if it
        does not within the boot timeout)."""
        await self._refuse_taken_name(spec.name)
        work = self._dir(spec.name)
        boot = await self._boot_files(spec.image, spec.config, b"", work)
        plan = DomainPlan(
            name=spec.name,
            domain_type=self._domain_type,
            job_id="",  # until a job takes it
            worker_id=spec.worker_id,
            gpus=(),
            pci_devices=(),
            cpu=spec.cpu,
            memory_bytes=spec.memory_bytes,
            kernel=str(boot.kernel),
            initrd=boot.initrd,
            cmdline=spec.config.cmdline,
            console_log=work / CONSOLE_LOG,
            disk=boot.disk,
            disk_format=spec.config.disk_format,
            pool=spec.pool,
            job_channel=work / JOB_CHANNEL,
        )
        domain = await self._define(plan)
        try:
            await self._boot(domain)
            await self._channels.connect(domain.UUIDString(), work / JOB_CHANNEL)
            await self._await_line(domain, WAITING_MARKER)
        except BaseException:
            with contextlib.suppress(SandboxError):
                await self.remove(domain.UUIDString())
            raise
        return await self._state(domain)

    async def take_warm(self, sandbox_id: str, spec: SandboxSpec[VmBlock]) -> SandboxState:
        """Make `spec`'s job the owner of a waiting guest, send it the job, and return
        once the guest printed its begin marker (the job's command has started)."""
        await self._refuse_taken_name(spec.name)
        domain = await self._domain(sandbox_id)
        channel = self._channels.take(sandbox_id)  # one take only, whatever happens next
        if channel is None:
            raise SandboxError(f"{domain.name()} is no guest of this driver waiting for a job")
        try:
            owner = await self._owner(domain)
            await self._set_owner(domain, spec, owner)  # from here `find` gives the job's
            await channel.send(job_frame(spec.command, spec.environment))
        finally:
            await channel.close()
        try:
            await self._await_line(domain, BEGIN_MARKER)
        except SandboxError:
            # The guest has the job: it is the job's sandbox now, however it goes on (a
            # guest that stops without running it ends the job `GuestFailed`); another
            # guest must never be given the same job.
            log.warning("%s: no begin marker after its job was sent", domain.name())
        return await self._state(domain)

    async def _set_owner(
        self, domain: libvirt.virDomain, spec: SandboxSpec[VmBlock], owner: DomainOwner | None
    ) -> None:
        pool = owner.labels.get(LABEL_POOL, "") if owner else ""
        element = metadata_element(
            spec.job_id,
            spec.worker_id,
            tuple(gpu.uuid for gpu in spec.gpus),
            pool=pool,
            taken_at=datetime.now(UTC),
            labels=spec.labels,
        )
        # Both the running domain's and its definition's: the next worker reads either.
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        async with translated("set metadata of", domain.name()):
            await self._libvirt.call(
                domain.setMetadata,
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                metadata_xml(element),
                METADATA_PREFIX,
                METADATA_NS,
                flags,
            )

    async def _refuse_taken_name(self, name: str) -> None:
        # Checked before the work directory is cleared: it may be that domain's.
        if await self.find(name) is not None:
            raise SandboxNameTaken(f"libvirt define {name}: a domain of that name exists")

    async def _boot_files(self, kernel: str, block: VmBlock, job: bytes, work: Path) -> BootFiles:
        await self._connection()  # first: it knows the hypervisor's group
        return await make_boot_files(
            self._images, kernel, block, job=job, work=work, hypervisor_group=self._hypervisor_group
        )

    async def _define(self, plan: DomainPlan) -> libvirt.virDomain:
        conn = await self._connection()
        async with translated("define", plan.name):
            return await self._libvirt.call(conn.defineXML, domain_xml(plan))

    async def _boot(self, domain: libvirt.virDomain) -> None:
        await asyncio.to_thread(record_started, self._dir(domain.name()))
        async with translated("start", domain.name()):
            await self._libvirt.call(domain.create)

    async def start(self, sandbox_id: str) -> None:
        """Boot the guest; return once its job's command has started (its begin marker
        is on the console): the boot is the job's `starting`, not its `running`."""
        domain = await self._domain(sandbox_id)
        await self._boot(domain)
        if self._domain_type != "test":  # libvirt's test driver runs no guest at all
            await self._await_line(domain, BEGIN_MARKER)

    async def wait(self, sandbox_id: str) -> int:
        domain = await self._domain(sandbox_id)
        stopped = self._watcher.watch(sandbox_id)
        try:
            # Registered first, checked second: a stop in between is not missed. The
            # job has ended at its exit marker; the guest's power-off is not waited for.
            if await self._libvirt.call(domain.isActive):
                await wait_for_exit_marker(self._dir(domain.name()) / CONSOLE_LOG, stopped)
        finally:
            self._watcher.forget(sandbox_id, stopped)
        code = exit_code(await self._console(domain.name()))
        if code is None and sandbox_id in self._stopped:
            return STOPPED_EXIT_CODE
        if code is None:
            summary = await self._console_summary(domain.name())
            raise SandboxError(
                f"the guest stopped without reporting an exit code; console: {summary}",
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
        await self._channels.close(sandbox_id)
        conn = await self._connection()
        try:
            domain = await self._libvirt.call(conn.lookupByUUIDString, sandbox_id)
        except libvirt.libvirtError as exc:
            if missing_domain(exc):
                return
            raise SandboxError(f"libvirt lookup {sandbox_id}: {exc.get_error_message()}") from exc
        name = domain.name()
        self._stopped.discard(sandbox_id)
        async with translated("remove", name):
            try:
                if await self._libvirt.call(domain.isActive):
                    await self._libvirt.call(domain.destroy)
            except libvirt.libvirtError:
                # It may have powered off between the two calls, as a guest past its
                # exit marker does: only one still running is an error.
                if await self._libvirt.call(domain.isActive):
                    raise
            await self._libvirt.call(domain.undefine)
        shutil.rmtree(self._dir(name), ignore_errors=True)
