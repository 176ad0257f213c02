"""A warm container's stdin, held through libpod's hijacked attach connection."""

from __future__ import annotations

import asyncio

import aiohttp

from sandfleet.workers.drivers.podman.client import LibpodClient


class PodmanStdin:
    """`warm_containers.HeldStdin` on libpod's attach (stdin only, upgraded to a raw
    stream). Podman ends the attach when the container exits; the connection's
    transport closing says so."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @classmethod
    async def attach(cls, api: LibpodClient, container_id: str) -> PodmanStdin:
        params = {"stdin": "true", "stdout": "false", "stderr": "false", "stream": "true"}
        return cls(await api.hijack("POST", "containers", container_id, "attach", params=params))

    @property
    def _transport(self) -> asyncio.Transport | None:
        connection = self._response.connection
        return None if connection is None else connection.transport

    @property
    def is_open(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing()

    async def send_last(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None:
            transport.write(data)
            if transport.can_write_eof():
                transport.write_eof()  # after what was written: stdin ends there
        await self.aclose()

    async def aclose(self) -> None:
        self._response.close()  # the transport sends what it holds first, then closes
