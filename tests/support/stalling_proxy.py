"""A runtime that stops answering, made from the real one: a unix socket in front of a
runtime's API socket that passes everything through, except that it holds (never
forwards, never answers) each request whose bytes contain a given marker.

For the tests of what a driver does when its runtime hangs: a pull that never ends,
a create that never returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse


class StallingProxy:
    """`async with StallingProxy(runtime_url, socket_path, b"/images/") as proxy:` then
    point a driver at `proxy.url`; `proxy.stalled` is set once a request is held."""

    def __init__(self, runtime_url: str, path: Path, stall_on: bytes) -> None:
        self._target = urlparse(runtime_url).path
        self._path = path
        self._stall_on = stall_on
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.stalled = asyncio.Event()

    @property
    def url(self) -> str:
        return f"unix://{self._path}"

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        runtime_r, runtime_w = await asyncio.open_unix_connection(self._target)
        self._writers += [client_w, runtime_w]
        for pump in (self._requests(client_r, runtime_w), self._copy(runtime_r, client_w)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requests(self, client: asyncio.StreamReader, runtime: asyncio.StreamWriter) -> None:
        while chunk := await client.read(65536):
            if self._stall_on in chunk:
                self.stalled.set()
                await asyncio.Event().wait()  # held until the proxy closes
            runtime.write(chunk)
            await runtime.drain()
        with contextlib.suppress(OSError):
            runtime.write_eof()

    @staticmethod
    async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
            sink.close()
