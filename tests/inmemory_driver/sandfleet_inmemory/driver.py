"""The in-memory driver: the `SandboxDriver` Protocol with nothing behind it but dicts.

Hooks let a test put itself between the runtime and a "runtime": `hooks["create"]`
is awaited with the sandbox's name just before a create, `hooks["wait"]` with its
id before a wait, and so on for every operation. A hook may wait (to hold the
runtime at that step), raise (to fail the operation), or change `sandboxes` (a
dead worker's create landing late). `calls` records every operation in order.

It keeps warm sandboxes too (the optional `WarmSandboxes` part of the contract): a warm
one runs, waiting, until `take_warm` renames it to its job's and runs the job in it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from sandfleet.common.errors import SandboxError, SandboxNameTaken
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import (
    LABEL_POOL,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    WarmSpec,
)
from sandfleet.workers.drivers.blocks import parse_block
from sandfleet.workers.gpu.inventory import Gpu

Hook = Callable[[str], Awaitable[None]]


class InMemoryBlock(BaseModel):
    """`template.driver_config.inmemory`: what the sandbox does."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    exit_code: int = Field(default=0, ge=0, le=255)
    output: str | None = Field(default=None, max_length=65536)  # default: the command, echoed
    run_seconds: float = Field(default=0.0, ge=0, le=3600)
    gpu_device_ids: list[str] = Field(default_factory=list, max_length=16)


@dataclass(kw_only=True)
class InMemorySandbox:
    sandbox_id: str
    name: str
    labels: dict[str, str]
    block: InMemoryBlock
    output: str
    gpu_devices: tuple[str, ...] = ()
    status: SandboxStatus = SandboxStatus.CREATED
    exit_code: int | None = None
    started_at: datetime | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None

    def state(self) -> SandboxState:
        return SandboxState(
            sandbox_id=self.sandbox_id,
            name=self.name,
            status=self.status,
            exit_code=self.exit_code,
            started_at=self.started_at,
            labels=dict(self.labels),
        )

    def end(self, exit_code: int) -> None:
        self.status, self.exit_code = SandboxStatus.EXITED, exit_code
        self.ended.set()


class InMemoryDriver:
    name = "inmemory"

    def __init__(self, *, stop_exit_code: int = 143, cdi_kind: str = "nvidia.com/gpu") -> None:
        self._stop_exit_code = stop_exit_code
        self._cdi_kind = cdi_kind
        self.sandboxes: dict[str, InMemorySandbox] = {}  # by name
        self.hooks: dict[str, Hook] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, sandbox name)

    def parse_config(self, job: Job) -> InMemoryBlock:
        return parse_block(InMemoryBlock, job)

    def device_id(self, gpu: Gpu) -> str:
        return f"{self._cdi_kind}={gpu.index}"

    async def create(self, spec: SandboxSpec[InMemoryBlock]) -> SandboxState:
        await self._enter("create", spec.name)
        if spec.name in self.sandboxes:
            raise SandboxNameTaken(f"inmemory create {spec.name}: the name is already in use")
        echo = " ".join(spec.command) + "\n" if spec.command else ""
        sandbox = InMemorySandbox(
            sandbox_id=uuid.uuid4().hex,
            name=spec.name,
            labels=dict(spec.labels),
            block=spec.config,
            output=spec.config.output if spec.config.output is not None else echo,
            gpu_devices=spec.gpu_devices,
        )
        self.sandboxes[spec.name] = sandbox
        return sandbox.state()

    async def create_warm(self, spec: WarmSpec[InMemoryBlock]) -> SandboxState:
        await self._enter("create_warm", spec.name)
        sandbox = InMemorySandbox(
            sandbox_id=uuid.uuid4().hex,
            name=spec.name,
            labels=dict(spec.labels),
            block=spec.config,
            output="",
            status=SandboxStatus.RUNNING,  # waiting for its job
            started_at=datetime.now(UTC),
        )
        self.sandboxes[spec.name] = sandbox
        return sandbox.state()

    async def take_warm(self, sandbox_id: str, spec: SandboxSpec[InMemoryBlock]) -> SandboxState:
        sandbox = await self._entered("take_warm", sandbox_id)
        waiting = sandbox.runner is None and sandbox.status is SandboxStatus.RUNNING
        if not waiting or LABEL_POOL not in sandbox.labels or sandbox.name == spec.name:
            raise SandboxError(f"inmemory take {sandbox_id}: not a waiting warm sandbox")
        if spec.name in self.sandboxes:
            raise SandboxNameTaken(f"inmemory take {spec.name}: the name is already in use")
        del self.sandboxes[sandbox.name]
        sandbox.name, sandbox.started_at = spec.name, None
        sandbox.labels = {**sandbox.labels, **spec.labels}
        echo = " ".join(spec.command) + "\n" if spec.command else ""
        sandbox.output = spec.config.output if spec.config.output is not None else echo
        sandbox.block = spec.config
        self.sandboxes[spec.name] = sandbox
        if spec.config.run_seconds == 0:  # over before the take returns, as a fast job can be
            sandbox.end(spec.config.exit_code)
        else:
            sandbox.runner = asyncio.create_task(self._run(sandbox))
        return sandbox.state()

    async def start(self, sandbox_id: str) -> None:
        sandbox = await self._entered("start", sandbox_id)
        if sandbox.status is SandboxStatus.CREATED:
            sandbox.status, sandbox.started_at = SandboxStatus.RUNNING, datetime.now(UTC)
            sandbox.runner = asyncio.create_task(self._run(sandbox))

    async def wait(self, sandbox_id: str) -> int:
        sandbox = await self._entered("wait", sandbox_id)
        await sandbox.ended.wait()
        assert sandbox.exit_code is not None
        return sandbox.exit_code

    async def stop(self, sandbox_id: str, *, grace_seconds: float) -> None:
        sandbox = await self._entered("stop", sandbox_id)
        if sandbox.status is SandboxStatus.RUNNING:
            self._halt(sandbox, self._stop_exit_code)

    async def remove(self, sandbox_id: str) -> None:
        await self._enter("remove", sandbox_id)
        sandbox = self._by_id(sandbox_id)
        if sandbox is not None:
            self._halt(sandbox, self._stop_exit_code)
            del self.sandboxes[sandbox.name]

    async def find(self, name: str) -> SandboxState | None:
        await self._enter("find", name)
        sandbox = self.sandboxes.get(name)
        return None if sandbox is None else sandbox.state()

    async def list_sandboxes(self) -> list[SandboxState]:
        await self._enter("list", "")
        return [sandbox.state() for sandbox in self.sandboxes.values()]

    async def output(self, sandbox_id: str, *, lines: int) -> str:
        sandbox = await self._entered("output", sandbox_id)
        return "".join(sandbox.output.splitlines(keepends=True)[-lines:])

    async def follow_output(self, sandbox_id: str) -> AsyncIterator[bytes]:
        # Not recorded in `calls`: the worker follows every sandbox it starts.
        sandbox = self._by_id(sandbox_id)
        if sandbox is None:
            raise SandboxError(f"inmemory logs {sandbox_id}: no such sandbox")
        yield sandbox.output.encode()  # printed at once, as it starts
        await sandbox.ended.wait()

    async def aclose(self) -> None:
        for sandbox in self.sandboxes.values():
            if sandbox.runner is not None:
                sandbox.runner.cancel()

    async def _run(self, sandbox: InMemorySandbox) -> None:
        await asyncio.sleep(sandbox.block.run_seconds)
        sandbox.end(sandbox.block.exit_code)

    def _halt(self, sandbox: InMemorySandbox, exit_code: int) -> None:
        if sandbox.runner is not None:
            sandbox.runner.cancel()
        if sandbox.status is SandboxStatus.RUNNING:
            sandbox.end(exit_code)

    async def _enter(self, operation: str, subject: str) -> None:
        self.calls.append((operation, self._name_of(subject)))
        hook = self.hooks.get(operation)
        if hook is not None:
            await hook(subject)

    async def _entered(self, operation: str, sandbox_id: str) -> InMemorySandbox:
        await self._enter(operation, sandbox_id)
        sandbox = self._by_id(sandbox_id)
        if sandbox is None:
            raise SandboxError(f"inmemory {operation} {sandbox_id}: no such sandbox")
        return sandbox

    def _by_id(self, sandbox_id: str) -> InMemorySandbox | None:
        return next((s for s in self.sandboxes.values() if s.sandbox_id == sandbox_id), None)

    def _name_of(self, subject: str) -> str:
        sandbox = self._by_id(subject)
        return subject if sandbox is None else sandbox.name
