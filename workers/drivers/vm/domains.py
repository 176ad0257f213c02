"""The VM driver's view of its domains through libvirt: the connection, and what each
domain is (its state, whose it is, its console). libvirtError never leaves this module
or driver.py.

A domain's owner is in its `<metadata>` (domain_xml.py): the job, its worker and GPUs,
the job's labels; a warm guest's pool profile, and once a job took it, that job and
when. A running domain cannot be renamed, so a taken warm guest keeps its warm name
and `find(sandfleet-<job>)` finds it by its metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt

from sandfleet.common.errors import SandboxError
from sandfleet.common.events import bounded_output
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_JOB_ID,
    LABEL_POOL,
    WARM_NAME_PREFIX,
    SandboxState,
    SandboxStatus,
)
from sandfleet.workers.drivers.errors import error_translator
from sandfleet.workers.drivers.vm.console_follow import follow_console, wait_for_line
from sandfleet.workers.drivers.vm.domain_xml import METADATA_NS, DomainOwner, dac_group, read_owner
from sandfleet.workers.drivers.vm.guest import exit_code, job_output
from sandfleet.workers.drivers.vm.job_files import CONSOLE_LOG, console_tail, started_at
from sandfleet.workers.drivers.vm.libvirt_loop import StopWatcher, libvirt_loop

NAME_PREFIX = "sandfleet-"
# How much of a running guest's console is read for its exit marker: the guest's own
# power-off messages follow it, a few hundred bytes.
ENDING_BYTES = 16 * 1024

log = logging.getLogger(__name__)

translated = error_translator(
    "libvirt",
    libvirt.libvirtError,
    lambda exc: exc.get_error_message(),
)


def missing_domain(exc: libvirt.libvirtError) -> bool:
    return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


class LibvirtDomains:
    name = "vm"

    def __init__(
        self,
        *,
        uri: str,
        domain_type: str,
        work_dir: Path,
        console_tail_bytes: int,
        boot_timeout_seconds: float,
    ) -> None:
        self._uri = uri
        self._domain_type = domain_type
        self._work_dir = work_dir
        self._console_tail_bytes = console_tail_bytes
        self._boot_timeout_seconds = boot_timeout_seconds
        self._hypervisor_group: str | None = None  # read from libvirt with the connection
        self._libvirt = libvirt_loop()
        self._watcher = StopWatcher()
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._opening = asyncio.Lock()

    async def _connection(self) -> libvirt.virConnect:
        async with self._opening:
            if self._conn is None:
                async with translated("connect", self._uri):
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

    def _dir(self, name: str) -> Path:
        return self._work_dir / name

    async def _domain(self, sandbox_id: str) -> libvirt.virDomain:
        conn = await self._connection()
        async with translated("lookup", sandbox_id):
            return await self._libvirt.call(conn.lookupByUUIDString, sandbox_id)

    async def find(self, name: str) -> SandboxState | None:
        domain = await self._named(name)
        job_name = name.startswith(NAME_PREFIX) and not name.startswith(WARM_NAME_PREFIX)
        if domain is None and job_name:
            domain = await self._taken_warm_guest(name.removeprefix(NAME_PREFIX))
        return None if domain is None else await self._state_unless_gone(domain)

    async def _named(self, name: str) -> libvirt.virDomain | None:
        conn = await self._connection()
        try:
            return await self._libvirt.call(conn.lookupByName, name)
        except libvirt.libvirtError as exc:
            if missing_domain(exc):
                return None
            raise SandboxError(f"libvirt lookup {name}: {exc.get_error_message()}") from exc

    async def _taken_warm_guest(self, job_id: str) -> libvirt.virDomain | None:
        """The warm guest whose metadata says `job_id` took it, if any: only warm
        guests are read (a cold job's domain is found by its name)."""
        for domain in await self._domains(WARM_NAME_PREFIX):
            owner = await self._owner(domain)
            if owner is not None and owner.labels.get(LABEL_JOB_ID) == job_id:
                return domain
        return None

    async def _domains(self, prefix: str) -> list[libvirt.virDomain]:
        conn = await self._connection()
        async with translated("list", "domains"):
            domains = await self._libvirt.call(conn.listAllDomains, 0)
        return [domain for domain in domains if domain.name().startswith(prefix)]

    async def list_sandboxes(self) -> list[SandboxState]:
        """Every job's domain, and the warm guests (with their pool, and no job id
        until a job takes one)."""
        states = [await self._listed_state(d) for d in await self._domains(NAME_PREFIX)]
        return [s for s in states if s is not None and (s.job_id or LABEL_POOL in s.labels)]

    async def _listed_state(self, domain: libvirt.virDomain) -> SandboxState | None:
        """A listed domain's state. One that cannot be read (whatever its guest did to
        its files, whatever libvirt says of it) is logged and counted as running under
        the job its name gives: its GPUs stay claimed, and the rest are still listed.
        (A warm guest's name gives no job: it is listed as no job's.)"""
        name = domain.name()
        try:
            return await self._state_unless_gone(domain)
        except Exception as exc:
            log.warning("domain %s: its state cannot be read (%r); counted as running", name, exc)
            labels = {LABEL_DRIVER: self.name}
            if not name.startswith(WARM_NAME_PREFIX):
                labels[LABEL_JOB_ID] = name.removeprefix(NAME_PREFIX)
            return SandboxState(
                sandbox_id=domain.UUIDString(),
                name=name,
                status=SandboxStatus.RUNNING,
                exit_code=None,
                started_at=None,
                labels=labels,
            )

    async def _state_unless_gone(self, domain: libvirt.virDomain) -> SandboxState | None:
        """The domain's state, or None if it was undefined since it was looked up
        (another worker removing it is no error of ours)."""
        try:
            return await self._state(domain)
        except SandboxError as exc:
            cause = exc.__cause__
            if isinstance(cause, libvirt.libvirtError) and missing_domain(cause):
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

    async def _console_summary(self, name: str) -> str:
        """The console's last lines, as much of it as any job's output, and no more (the
        guest wrote it)."""
        console = await self._console(name)
        return bounded_output(job_output(console, lines=20).strip()) or "(no console output)"

    async def _await_line(self, domain: libvirt.virDomain, line: str) -> None:
        """Return once the guest printed `line` on its console; SandboxError with the
        console's tail if it stopped first, or did not within the boot timeout."""
        sandbox_id, name = domain.UUIDString(), domain.name()
        stopped = self._watcher.watch(sandbox_id)
        try:
            async with translated("inspect", name):
                # Registered first, checked second: a stop in between is not missed.
                if not await self._libvirt.call(domain.isActive) and not stopped.done():
                    stopped.set_result(libvirt.VIR_DOMAIN_EVENT_STOPPED)
            async with asyncio.timeout(self._boot_timeout_seconds):
                if await wait_for_line(self._dir(name) / CONSOLE_LOG, line, stopped):
                    return
            why = "stopped"
        except TimeoutError:
            limit = f"{self._boot_timeout_seconds:g}s (SANDFLEET_VM_BOOT_TIMEOUT_SECONDS)"
            why = f"did not print it within {limit}"
        finally:
            self._watcher.forget(sandbox_id, stopped)
        summary = await self._console_summary(name)
        raise SandboxError(
            f"the guest {why} before printing {line}; console: {summary}", reason="GuestFailed"
        )

    async def _state(self, domain: libvirt.virDomain) -> SandboxState:
        name = domain.name()
        async with translated("inspect", name):
            active = await self._libvirt.call(domain.isActive)
            owner = await self._owner(domain)
        was_started, started = await asyncio.to_thread(started_at, self._dir(name))
        code: int | None = None
        if active:  # a guest past its exit marker only powers off: its job has ended
            code = exit_code(await asyncio.to_thread(console_tail, self._dir(name), ENDING_BYTES))
            status = SandboxStatus.RUNNING if code is None else SandboxStatus.EXITED
        elif was_started:
            status, code = SandboxStatus.EXITED, exit_code(await self._console(name))
        else:
            status = SandboxStatus.CREATED
        return SandboxState(
            sandbox_id=domain.UUIDString(),
            name=name,
            status=status,
            exit_code=code,
            # A taken warm guest's job started when it was taken, not when it booted.
            started_at=owner.taken_at if owner and owner.taken_at else started,
            labels={**(owner.labels if owner else {}), LABEL_DRIVER: self.name},
        )

    async def _owner(self, domain: libvirt.virDomain) -> DomainOwner | None:
        """Whose the domain is, from its metadata; None if it has none of ours."""
        try:
            metadata = await self._libvirt.call(
                domain.metadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS
            )
            return read_owner(metadata)
        except (libvirt.libvirtError, ET.ParseError):
            return None
