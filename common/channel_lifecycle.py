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
    """`await setup`; if the caller is cancelled meanwhile, let `setup` finish, then
    `await undo()` and re-raise the cancellation."""
    task = asyncio.ensure_future(setup)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with suppress(Exception, TimeoutError):
            await asyncio.wait_for(task, SETUP_GRACE_SECONDS)
        with suppress(Exception):
            await undo()
        raise


async def close_whole(channel: AbstractChannel | None) -> None:
    """Close `channel` (if open); a cancelled caller is cancelled at once, the closing
    goes on."""
    if channel is not None and not channel.is_closed:
        await asyncio.shield(channel.close())
