"""What the Docker and Podman drivers share to keep warm containers: the containers a
driver object made and holds the stdin of, and handing one its job.

Shared by the container drivers; it is not a driver itself. A warm container's main
process is the shim of `warm_shim`; taking it renames it to the job's name, then writes
the job's argv and environment to the shim, which exec's the job's command. From then
on it is the job's container as a cold one would be (`wait`, `output`, `stop`, ...).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sandfleet.common.errors import SandboxError, SandboxNameTaken
from sandfleet.workers.drivers.base import (
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    WarmSpec,
)
from sandfleet.workers.drivers.warm_shim import job_argv, job_lines


class HeldStdin(Protocol):
    """A warm container's stdin, held through an attach connection to its runtime."""

    @property
    def is_open(self) -> bool:
        """False once the runtime has ended the attach (the container has exited)."""
        ...

    async def send_last(self, data: bytes) -> None:
        """Write `data`, then close stdin (the runtime sees its end)."""
        ...

    async def aclose(self) -> None:
        """Drop the connection: a container still waiting reads the end of its stdin."""
        ...


@dataclass(frozen=True)
class ImageDefaults:
    """What a cold container of an image runs when the job names no command."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ImageDefaults:
        """From an image inspect's `Config` (Docker and libpod name them alike)."""
        config = config or {}
        return cls(
            entrypoint=tuple(config.get("Entrypoint") or ()),
            cmd=tuple(config.get("Cmd") or ()),
        )


@dataclass(frozen=True)
class Waiting:
    """A warm container this driver object started, whose stdin it holds."""

    stdin: HeldStdin
    image: ImageDefaults
    labels: Mapping[str, str]  # its own, fixed at create: driver, worker, pool


def as_sandbox_spec(warm: WarmSpec[Any]) -> SandboxSpec[Any]:
    """The sandbox a job of this profile would get, with no command or environment of
    its own: what a warm container is created from, so it is bounded as a cold one."""
    return SandboxSpec(
        name=warm.name,
        job_id="",
        worker_id=warm.worker_id,
        image=warm.image,
        command=(),
        environment={},
        labels=warm.labels,
        cpu=warm.cpu,
        memory_bytes=warm.memory_bytes,
        config=warm.config,
    )


Rename = Callable[[str, str], Awaitable[None]]
Find = Callable[[str], Awaitable[SandboxState | None]]


class WaitingContainers:
    """The warm containers one driver object holds, by container id."""

    def __init__(self, runtime: str) -> None:
        self._runtime = runtime  # "docker", "podman": for messages
        self._waiting: dict[str, Waiting] = {}

    def hold(self, sandbox_id: str, waiting: Waiting) -> None:
        self._waiting[sandbox_id] = waiting

    async def take(
        self, sandbox_id: str, spec: SandboxSpec[Any], rename: Rename, find: Find
    ) -> SandboxState:
        """`WarmSandboxes.take_warm`, `rename` being the runtime's (SandboxNameTaken
        when the name is in use) and `find` the driver's."""
        waiting = self._waiting.pop(sandbox_id, None)  # no second take, even concurrent
        if waiting is None:
            raise SandboxError(
                f"{self._runtime} take {sandbox_id} as {spec.name}: no warm container of "
                "this worker waits under that id (taken already, or not made here)"
            )
        try:
            await rename(sandbox_id, spec.name)
            # Docker keeps a stdin-only attach open after the container has exited:
            # only the runtime's state says the shim is still there to read the job.
            state = await find(sandbox_id)
            return await self._start_job(sandbox_id, spec, waiting, state)
        except SandboxNameTaken:  # the rename's: left as it was, still takeable
            self._waiting[sandbox_id] = waiting
            raise
        except BaseException:
            await waiting.stdin.aclose()  # no job will reach it: it ends unused
            raise

    async def _start_job(
        self,
        sandbox_id: str,
        spec: SandboxSpec[Any],
        waiting: Waiting,
        state: SandboxState | None,
    ) -> SandboxState:
        argv = job_argv(spec.command, waiting.image.entrypoint, waiting.image.cmd)
        failure = self._unstartable(argv, waiting, state)
        if failure or state is None:
            raise SandboxError(f"{self._runtime} take {sandbox_id} as {spec.name}: {failure}")
        await waiting.stdin.send_last(job_lines(argv, spec.environment))
        return state

    @staticmethod
    def _unstartable(argv: Sequence[str], waiting: Waiting, state: SandboxState | None) -> str:
        running = state is not None and state.status is SandboxStatus.RUNNING
        if not (running and waiting.stdin.is_open):
            return "the warm container is no longer running"
        if not argv:
            return "no command: the job names none and its image has neither Entrypoint nor Cmd"
        return ""

    async def drop(self, sandbox_id: str) -> None:
        """Forget a container (removed): close its stdin if it was still waiting."""
        waiting = self._waiting.pop(sandbox_id, None)
        if waiting is not None:
            await waiting.stdin.aclose()

    async def aclose(self) -> None:
        """Every waiting container reads the end of its stdin, and exits unused."""
        while self._waiting:
            _, waiting = self._waiting.popitem()
            await waiting.stdin.aclose()
