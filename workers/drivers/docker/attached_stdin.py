"""A warm container's stdin, held through Docker's hijacked attach connection."""

from __future__ import annotations

import asyncio
import contextlib

from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream


class DockerStdin:
    """`warm_containers.HeldStdin` on aiodocker's attach stream (stdin only).

    Docker ends the attach when the container exits; a task reading the stream (which
    carries no output: stdout and stderr are not attached) sees that end."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._ended = asyncio.ensure_future(self._until_ended())

    @classmethod
    async def attach(cls, container: DockerContainer) -> DockerStdin:
        """Attached before the container starts, so no byte of its stdin is missed."""
        stream = container.attach(stdin=True)
        await stream.write_in(b"")  # connects (aiodocker connects on first use)
        return cls(stream)

    async def _until_ended(self) -> None:
        with contextlib.suppress(Exception):  # an error ends the attach as surely
            while await self._stream.read_out() is not None:
                pass

    @property
    def is_open(self) -> bool:
        return not self._ended.done()

    async def send_last(self, data: bytes) -> None:
        await self._stream.write_in(data)
        await self.aclose()  # a half-close first (EOF on stdin), then the connection

    async def aclose(self) -> None:
        await self._stream.close()
        self._ended.cancel()
