"""libvirt on its own thread, with its events on an asyncio loop there (libvirtaio).

libvirt allows one event implementation per process, registered before the first
connection, and its API calls block. So one daemon thread per process runs an
asyncio loop with libvirtaio's implementation; every libvirt call runs there, and
any other loop awaits it. Lifecycle events arrive on that thread and are handed to
the waiting loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import libvirtaio

T = TypeVar("T")

_lock = threading.Lock()
_instance: LibvirtLoop | None = None


class LibvirtLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name="libvirt-events", daemon=True
        )
        self._thread.start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        # libvirt prints every error to stderr by default; ours are raised and translated.
        libvirt.registerErrorHandler(_ignore_error, None)
        libvirtaio.virEventRegisterAsyncIOImpl(loop=self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a (blocking) libvirt call on the libvirt thread."""

        async def invoke() -> T:
            return function(*args)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(invoke(), self.loop))


def libvirt_loop() -> LibvirtLoop:
    global _instance  # noqa: PLW0603 - one event implementation per process, by libvirt's rule
    with _lock:
        if _instance is None:
            _instance = LibvirtLoop()
        return _instance


class StopWatcher:
    """Awaitable "this domain stopped" notices from libvirt's lifecycle events."""

    _STOPPING = (
        libvirt.VIR_DOMAIN_EVENT_STOPPED,
        libvirt.VIR_DOMAIN_EVENT_CRASHED,
        libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
    )

    def __init__(self) -> None:
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]]] = {}
        self._lock = threading.Lock()

    def on_event(self, _conn: Any, domain: Any, event: int, _detail: int, _opaque: Any) -> None:
        """libvirt's callback (on the libvirt thread)."""
        if event not in self._STOPPING:
            return
        with self._lock:
            waiters = self._waiters.pop(domain.UUIDString(), [])
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future, event)

    def watch(self, uuid: str) -> asyncio.Future[int]:
        """A future resolved when domain `uuid` stops; register before checking its state."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        with self._lock:
            self._waiters.setdefault(uuid, []).append((loop, future))
        return future

    def forget(self, uuid: str, future: asyncio.Future[int]) -> None:
        with self._lock:
            waiters = self._waiters.get(uuid, [])
            self._waiters[uuid] = [(lp, f) for lp, f in waiters if f is not future]
            if not self._waiters[uuid]:
                del self._waiters[uuid]


def _ignore_error(_context: Any, _error: Any) -> None:
    return None


def _resolve(future: asyncio.Future[int], event: int) -> None:
    if not future.done():
        future.set_result(event)
