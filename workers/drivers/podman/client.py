"""A small client for Podman's libpod REST API over its unix socket (aiohttp).

Only the libpod endpoints: Podman 4.3's Docker-compatible API accepts GPU
`DeviceRequests` and silently runs the container without them.

Callers name an endpoint by its path segments (`"images", image, "exists"`); the client
encodes each one, so no name (an image reference, a container's) can change the path.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import aiohttp

from sandfleet.common.image_ref import url_path_segment

API = "/v4.0.0/libpod"
_REDIRECTS = {301, 302, 303, 307, 308}  # 304 "not modified" is podman's "already so"


class PodmanApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")

    @property
    def no_such_container(self) -> bool:
        # Podman 4.3 answers 500 "... no such container" for a container removed while
        # the request was under way (listed, then inspected after another worker's rm).
        return self.status == 404 or (self.status == 500 and "no such container" in self.message)

    @property
    def name_in_use(self) -> bool:
        # Podman 4.3 answers 500 "... that name is already in use", not 409.
        return self.status == 409 or "name is already in use" in self.message


def _connector(url: str) -> tuple[aiohttp.BaseConnector, str]:
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        # Not capped: each warm container holds a connection (its stdin's attach)
        # while it waits; aiohttp's default cap of 100 would starve every other call.
        return aiohttp.UnixConnector(path=parsed.path, limit=0), "http://podman"
    if parsed.scheme in {"http", "tcp"}:
        return aiohttp.TCPConnector(limit=0), f"http://{parsed.netloc}"
    raise ValueError(f"unsupported Podman URL {url!r} (unix:///path or tcp://host:port)")


class LibpodClient:
    def __init__(self, url: str) -> None:
        connector, self._base = _connector(url)
        # No total timeout: `wait` lasts as long as the sandbox does.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        *segments: str,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> bytes:
        """`segments` name the endpoint below the libpod API root, each one encoded."""
        path = "/".join(url_path_segment(segment) for segment in segments)
        # No redirects: the service answers each endpoint itself, and a redirect (its
        # router's, to a path it resolved) would lead to an endpoint not asked for.
        async with self._session.request(
            method, f"{self._base}{API}/{path}", params=params, json=body, allow_redirects=False
        ) as response:
            data = await response.read()
            if response.status >= 400 or response.status in _REDIRECTS:
                raise PodmanApiError(response.status, _error_message(data))
            return data

    async def stream(
        self, method: str, *segments: str, params: dict[str, str] | None = None
    ) -> AsyncIterator[bytes]:
        """The response body as it arrives (a followed log), in chunks of any size."""
        path = "/".join(url_path_segment(segment) for segment in segments)
        async with self._session.request(
            method, f"{self._base}{API}/{path}", params=params, allow_redirects=False
        ) as response:
            if response.status >= 400 or response.status in _REDIRECTS:
                raise PodmanApiError(response.status, _error_message(await response.read()))
            async for chunk in response.content.iter_any():
                yield chunk

    async def hijack(
        self, method: str, *segments: str, params: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """The connection of an endpoint that takes it over (attach), upgraded to a raw
        stream: the caller writes to `response.connection` and closes the response."""
        path = "/".join(url_path_segment(segment) for segment in segments)
        response = await self._session.request(
            method,
            f"{self._base}{API}/{path}",
            params=params,
            headers={"Connection": "Upgrade", "Upgrade": "tcp"},
            read_until_eof=False,
            allow_redirects=False,
        )
        if response.status != 101 or response.connection is None:
            message = _error_message(await response.read()) or "the connection was not upgraded"
            response.close()
            raise PodmanApiError(response.status, message)
        return response

    async def json(self, method: str, *segments: str, **kwargs: Any) -> Any:
        data = await self.request(method, *segments, **kwargs)
        return json.loads(data) if data else None


def _error_message(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return data.decode(errors="replace").strip()
    if isinstance(body, dict):
        return str(body.get("message") or body.get("cause") or body)
    return str(body)


def demultiplex(stream: bytes) -> str:
    """Docker-style multiplexed log frames (8-byte header each) → text, in order."""
    out, offset = [], 0
    while offset + 8 <= len(stream):
        kind, size = stream[offset], struct.unpack(">I", stream[offset + 4 : offset + 8])[0]
        if kind not in (0, 1, 2):  # not multiplexed after all (a TTY container)
            return stream.decode(errors="replace")
        out.append(stream[offset + 8 : offset + 8 + size])
        offset += 8 + size
    return b"".join(out).decode(errors="replace")


class FrameReader:
    """`demultiplex` for a stream read in chunks cut anywhere: whole frames' payloads."""

    def __init__(self) -> None:
        self._pending = b""
        self._raw = False  # not multiplexed after all (a TTY container): passed through

    def feed(self, chunk: bytes) -> bytes:
        if self._raw:
            return chunk
        data, out, offset = self._pending + chunk, [], 0
        while offset + 8 <= len(data):
            kind, size = data[offset], struct.unpack(">I", data[offset + 4 : offset + 8])[0]
            if kind not in (0, 1, 2):
                self._raw = True
                out.append(data[offset:])
                offset = len(data)
                break
            if offset + 8 + size > len(data):
                break
            out.append(data[offset + 8 : offset + 8 + size])
            offset += 8 + size
        self._pending = data[offset:]
        return b"".join(out)
