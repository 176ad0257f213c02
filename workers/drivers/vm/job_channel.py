"""The host end of warm guests' job channels (see guest.py for the guest's end).

A warm guest's virtio-serial port is a unix socket on the host, made by libvirt in the
guest's private directory. The driver that booted the guest connects to it at once and
holds the connection while the guest waits: the guest's read of its job blocks while a
host is connected and ends when none is, so a guest whose worker is gone (its process
ended, the connection with it) gives up and powers off without ever running a job.
Taking a guest takes its connection: it serves one job, and only one take can win.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from sandfleet.common.errors import SandboxError


class JobChannel:
    def __init__(self, socket: Path, writer: asyncio.StreamWriter) -> None:
        self._socket = socket
        self._writer = writer

    async def send(self, frame: bytes) -> None:
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except OSError as exc:  # ConnectionError included: the guest's end is gone
            raise SandboxError(f"sending the job on {self._socket}: {exc}") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class JobChannels:
    """The connections of the warm guests this driver booted that wait for a job."""

    def __init__(self) -> None:
        self._waiting: dict[str, JobChannel] = {}

    async def connect(self, sandbox_id: str, socket: Path) -> None:
        try:
            # The guest never writes on it: what is read back is never looked at.
            _, writer = await asyncio.open_unix_connection(str(socket))
        except OSError as exc:
            raise SandboxError(f"connecting to the guest's job channel {socket}: {exc}") from exc
        self._waiting[sandbox_id] = JobChannel(socket, writer)

    def take(self, sandbox_id: str) -> JobChannel | None:
        """The guest's channel, no longer held for it (None if it holds none here)."""
        return self._waiting.pop(sandbox_id, None)

    async def close(self, sandbox_id: str) -> None:
        channel = self.take(sandbox_id)
        if channel is not None:
            await channel.close()

    async def aclose(self) -> None:
        for sandbox_id in list(self._waiting):
            await self.close(sandbox_id)
