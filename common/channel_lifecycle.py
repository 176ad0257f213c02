"""Opening and closing a channel so that a caller's timeout cannot cut either in half.

aiormq answers a cancelled channel RPC (channel.open, basic.qos, basic.consume, even
channel.close) by closing that channel while frames for it may still be on their
way. RabbitMQ then sees a frame on a channel it has closed and closes the whole
connection (504 "expected 'channel.open'"), taking every other channel on it along:
a Client whose `run(timeout=1)` ran out while subscribing or unsubscribing would
fail its next request. So both run to their end in a task of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from aio_pika.abc import AbstractChannel

T = TypeVar("T")

# A set-up still unfinished after this long is cancelled after all: the broker is
# not answering, and the robust connection will be replaced anyway.
SETUP_GRACE_SECONDS = 10.0


async def set_up_whole(setup: Coroutine[Any, Any, T], undo: Callable[[], Awaitable[object]]) -> T:
    """`await setup`. If it fails, or the caller is cancelled meanwhile, `setup` is let
    finish (SETUP_GRACE_SECONDS at most), then `undo()` runs (even if the caller is
    cancelled again), and the failure or cancellation goes on."""
    task = asyncio.ensure_future(setup)
    try:
        return await asyncio.shield(task)
    except BaseException:
        try:
            if not task.done():
                await asyncio.wait({task}, timeout=SETUP_GRACE_SECONDS)
        finally:
            if not task.done():
                task.cancel()
            with suppress(Exception):
                await asyncio.shield(undo())
        raise


async def close_whole(channel: AbstractChannel | None) -> None:
    """Close `channel`; a cancelled caller is cancelled at once, the closing goes on.
    Closed even when it looks closed already: a robust channel whose connection is
    reconnecting looks closed, and one not closed by hand would be reopened, with its
    consumer, once the connection is back."""
    if channel is not None:
        with suppress(Exception):
            await asyncio.shield(channel.close())
