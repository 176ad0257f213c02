"""Running a long-lived service coroutine until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


async def until_signalled(service: Coroutine[Any, Any, None]) -> None:
    """Run `service`; the first SIGINT/SIGTERM cancels it so its `async with` blocks unwind."""
    task = asyncio.ensure_future(service)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class AsyncCloseable:
    """`async with` for resources ended by an idempotent `aclose()`."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Closeable:
    """`with` for resources ended by an idempotent `close()`."""

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def every(
    seconds: float, action: Callable[[], Awaitable[None]], *, wait_first: bool = False
) -> None:
    """`action` every `seconds`; a failure (a broker outage) is logged, not fatal."""
    if wait_first:
        await asyncio.sleep(seconds)
    while True:
        try:
            await action()
        except Exception:
            log.warning("%s failed; will retry", action.__name__, exc_info=True)
        await asyncio.sleep(seconds)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
