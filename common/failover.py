"""A robust connection that follows a RabbitMQ cluster from node to node.

aio-pika's RobustConnection reconnects to the one URL it was given: with that node
gone it waits for the node to come back, while the rest of the cluster (which holds
every replicated queue and stream) could serve at once. FailoverConnection keeps
aio-pika's machinery (reopening channels, re-declaring, re-consuming) and changes
only where each attempt goes: to the next node in the list, round and round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from yarl import URL

# Between rounds of attempts on a list of nodes: brief, as another node is likely up.
RECONNECT_INTERVAL_SECONDS = 1.0


class FailoverConnection(RobustConnection):
    """`FailoverConnection(nodes, ...)`: connects to `nodes[0]` first, then each new
    attempt (after a failed one, or after the connection was lost) to the node after
    the one last tried."""

    def __init__(
        self,
        nodes: Sequence[str],
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        self._nodes = tuple(URL(node) for node in nodes)
        self._attempts: int | None = None  # None until aio-pika's __init__ is done
        kwargs.setdefault("reconnect_interval", RECONNECT_INTERVAL_SECONDS)
        super().__init__(self._nodes[0], loop=loop, **kwargs)
        self._attempts = 0

    @property
    def nodes(self) -> tuple[URL, ...]:
        return self._nodes

    # aio-pika clears `transport` as each connection attempt begins (and on close),
    # and reads `url` only to make that attempt: the one place to choose its node.
    # (aio-pika 10.x; tests/integration/test_cluster.py fails if that ever changes.)
    @property
    def transport(self) -> Any:
        return self.__dict__.get("_transport")

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and self._attempts is not None:
            self.url = self._nodes[self._attempts % len(self._nodes)]
            self._attempts += 1
        self.__dict__["_transport"] = value
