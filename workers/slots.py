"""A worker's job slots: how many jobs it runs at once, and how many it may still take.

Jobs from a queue are counted the moment they are delivered (`enqueue`), wait for a
slot (`start_queued`), and give it back when they end (`finish`); one that ends before
it got a slot (cancelled while it waited) leaves the queue (`leave_queue`). Jobs taken over from
a dead worker start at once (`start_now`), even past the capacity: their sandboxes run
whether or not anyone watches them. `free` is what the consumers may still prefetch.
"""

from __future__ import annotations

import asyncio


class Slots:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a worker needs at least one slot")
        self.capacity = capacity
        self._running = 0
        self._queued = 0
        self._changed = asyncio.Condition()

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        """Jobs delivered and waiting for a slot."""
        return self._queued

    @property
    def free(self) -> int:
        return max(0, self.capacity - self._running - self._queued)

    def enqueue(self) -> None:
        self._queued += 1

    async def start_queued(self) -> None:
        """Wait for a slot and take it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._running < self.capacity)
            self._queued -= 1
            self._running += 1

    def leave_queue(self) -> None:
        self._queued -= 1

    def start_now(self) -> None:
        self._running += 1

    async def finish(self) -> None:
        async with self._changed:
            self._running -= 1
            self._changed.notify_all()
