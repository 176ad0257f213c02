"""Consuming a worker's job queues without taking more jobs than it has free slots.

A worker reads two quorum queues (its driver's shared queue and its host's), and
quorum queues have no channel-wide prefetch. So each consumer is started with a
prefetch equal to the free slots, and both are cancelled the moment the slots are
full; they are started again, with the new free count, when a job finishes. A
delivery that raced in after the slots filled waits for a slot (it is never
requeued: RabbitMQ 3.10 counts every requeue toward the delivery limit).

Jobs taken over from a dead worker come from the host's journal, not a queue, but
use slots all the same: their sandboxes run whether or not anyone watches them, so
they start at once, even past the slot count, and new deliveries wait until the
host is back under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

log = logging.getLogger(__name__)

JobHandler = Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]


class JobIntake:
    def __init__(
        self,
        channel: AbstractChannel,
        queues: Sequence[AbstractQueue],
        *,
        slots: int,
        handle: JobHandler,
    ) -> None:
        self._channel = channel
        self._queues = queues
        self._slots = slots
        self._handle = handle
        self._running = 0  # jobs in hand that hold a slot
        self._slot_freed = asyncio.Condition()
        self._held = 0  # jobs in hand: running or waiting for a slot
        self._consumer_tags: dict[str, str] = {}  # queue name -> consumer tag
        self._toggle = asyncio.Lock()
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def free_slots(self) -> int:
        return max(0, self._slots - self._held)

    async def start(self) -> None:
        await self._resume()

    async def stop_consuming(self) -> None:
        self._stopped = True
        await self._pause()

    @property
    def in_hand(self) -> set[asyncio.Task[None]]:
        """The tasks handling jobs right now, taken-over ones included."""
        return set(self._tasks)

    def take_over(self, job: Coroutine[Any, Any, None]) -> None:
        """Run a job whose sandbox already exists (no message): it takes a slot now."""
        self._spawn(self._hold_slot(job, wait_for_slot=False))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._spawn(self._hold_slot(self._handle(message), wait_for_slot=True))

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        # Counted before the task runs, so a `start()` right after a take-over sees it.
        self._held += 1
        # The job runs in a task of ours, not in aio-pika's callback task: a connection
        # lost mid-job cancels the latter, and must not abandon a running sandbox.
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hold_slot(self, job: Coroutine[Any, Any, None], *, wait_for_slot: bool) -> None:
        try:
            if self._held >= self._slots:
                await self._pause()
            async with self._slot_freed:
                if wait_for_slot:
                    await self._slot_freed.wait_for(lambda: self._running < self._slots)
                self._running += 1
            try:
                await job
            finally:
                async with self._slot_freed:
                    self._running -= 1
                    self._slot_freed.notify_all()
        finally:
            job.close()  # no-op once awaited; frees it if cancelled before it ran
            self._held -= 1
            if not self._stopped:
                await self._resume()

    async def _pause(self) -> None:
        async with self._toggle:
            for queue in self._queues:
                tag = self._consumer_tags.pop(queue.name, None)
                if tag is not None:
                    await queue.cancel(tag)

    async def _resume(self) -> None:
        async with self._toggle:
            free = self.free_slots
            if self._stopped or free == 0 or self._consumer_tags:
                return
            # Per-consumer prefetch (quorum queues ignore the global flag); applies to
            # the consumers started below.
            await self._channel.set_qos(prefetch_count=free)
            for queue in self._queues:
                self._consumer_tags[queue.name] = await queue.consume(self._on_message)
