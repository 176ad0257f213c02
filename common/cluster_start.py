"""Starting while a cluster node is still bringing up its replicas.

A node that has just (re)joined its cluster accepts connections before it runs its
replica of every stream and quorum queue: consuming a stream there is refused with
406 "does not have a replica on the local node", and a queue whose home is a node
still down answers 404 "home node … is down or inaccessible". Both pass in seconds.
After start-up the robust connection rides them out by itself (a failed restore is
another reconnection, to the next node); at start-up nothing would, so the process
would exit. The same goes for a node stopped while a process starts on it (320
CONNECTION_FORCED). `start_when_cluster_ready` tries the start-up again instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ConnectionClosed
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_fixed

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a starting node says; anything else (a refused login, a 406 on arguments) is
# a real error, raised at once.
_STILL_STARTING = (
    "does not have a replica on the local node",
    "is down or inaccessible",
    "stopped by supervisor",
)
STARTUP_RETRY_SECONDS = 120.0


def cluster_still_starting(exc: BaseException) -> bool:
    """Whether `exc` says a node is still starting, or went away mid-start (the broker
    closed the connection for a shutdown; the next try goes to another node)."""
    if isinstance(exc, ChannelInvalidStateError):
        return True
    if isinstance(exc, ConnectionClosed) and "CONNECTION_FORCED" in str(exc):
        return True
    return isinstance(exc, AMQPError) and any(text in str(exc) for text in _STILL_STARTING)


async def start_when_cluster_ready(
    start: Callable[[], Awaitable[T]],
    undo: Callable[[], Awaitable[object]],
    *,
    within: float = STARTUP_RETRY_SECONDS,
) -> T:
    """`await start()`; after a failure, `await undo()`, and `start()` again (for
    `within` seconds) if the failure is a cluster node still starting."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(cluster_still_starting),
        stop=stop_after_delay(within),
        wait=wait_fixed(1),
        before_sleep=lambda state: log.warning(
            "a broker node is still starting (%s); starting again", state.outcome
        ),
        reraise=True,
    ):
        with attempt:
            try:
                return await start()
            except BaseException:
                await undo()
                raise
    raise AssertionError("unreachable: tenacity re-raises the last failure")
