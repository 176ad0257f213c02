"""Consuming a worker's job queues without taking more jobs than it has free slots.

A worker reads two quorum queues (its driver's shared queue and its host's), and
quorum queues have no channel-wide prefetch. So each consumer is started with a
prefetch equal to the free slots, and both are cancelled the moment no slot is free;
they are started again, with the new free count, when a job ends. A delivery that
raced in after the slots filled waits for a slot (it is never requeued: RabbitMQ 3.10
counts every requeue toward the delivery limit).

Jobs taken over from a dead worker come from the host's journal, not a queue, but
take slots all the same (see `Slots`), and new deliveries wait until the worker is
back under its capacity.

Every job runs in a task of the intake's own, not in aio-pika's callback task: a
connection lost mid-job cancels the latter, and must not abandon a running sandbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from sandfleet.workers.slots import Slots

log = logging.getLogger(__name__)

JobHandler = Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]


class JobIntake:
    def __init__(
        self,
        channel: AbstractChannel,
        queues: Sequence[AbstractQueue],
        slots: Slots,
        handle: JobHandler,
    ) -> None:
        self._channel = channel
        self._queues = queues
        self._slots = slots
        self._handle = handle
        self._consumer_tags: dict[str, str] = {}  # queue name -> consumer tag
        self._toggle = asyncio.Lock()  # one pause or resume at a time
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def channel(self) -> AbstractChannel:
        """The channel the job queues are consumed on."""
        return self._channel

    @property
    def in_hand(self) -> set[asyncio.Task[None]]:
        """The tasks running jobs right now, taken-over ones included."""
        return set(self._tasks)

    async def start(self) -> None:
        await self._resume()

    async def stop(self) -> None:
        """Take no more jobs; those in hand go on."""
        self._closed = True
        try:
            await self._pause()
        except Exception:
            # The channel is closed or not yet restored after a lost connection: its
            # consumers went with it, and a robust queue asked to cancel one forgets it,
            # so none comes back when the channel is restored. The drain goes on.
            log.warning("job consumers not cancelled: their channel is down", exc_info=True)

    def run_taken_over(self, job: Coroutine[Any, Any, None]) -> None:
        """Run a job taken over from a dead worker: its sandbox exists, so it starts now."""
        self._slots.start_now()  # counted at once: a `start()` right after sees it
        self._spawn(self._run_taken_over(job))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._slots.enqueue()
        self._spawn(self._run_delivery(message))

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_taken_over(self, job: Coroutine[Any, Any, None]) -> None:
        try:
            await self._pause_if_full()
            await job
        finally:
            await self._done(job, ran=True)

    async def _run_delivery(self, message: AbstractIncomingMessage) -> None:
        job, ran = self._handle(message), False
        try:
            await self._pause_if_full()
            await self._slots.start_queued()
            ran = True
            await job
        finally:
            await self._done(job, ran=ran)

    async def _done(self, job: Coroutine[Any, Any, None], *, ran: bool) -> None:
        """Whatever ended it (cancelled before it ran included): its slot is given back."""
        job.close()  # no-op once awaited; frees it if cancelled before it ran
        if ran:
            await self._slots.finish()
        else:
            self._slots.leave_queue()
        if not self._closed:
            await self._resume()

    async def _pause_if_full(self) -> None:
        if self._slots.free == 0:
            try:
                await self._pause()
            except Exception:
                # A broker outage: the job runs all the same; a delivery that comes in
                # meanwhile waits for a slot.
                log.warning("could not pause the job consumers", exc_info=True)

    async def _pause(self) -> None:
        """Cancel every consumer, each even if another's cancel fails (the first
        failure is raised after)."""
        async with self._toggle:
            failure: Exception | None = None
            for queue in self._queues:
                tag = self._consumer_tags.pop(queue.name, None)
                if tag is None:
                    continue
                try:
                    await queue.cancel(tag)
                except Exception as exc:
                    failure = failure or exc
            if failure is not None:
                raise failure

    async def _resume(self) -> None:
        async with self._toggle:
            free = self._slots.free
            if self._closed or free == 0 or self._consumer_tags:
                return
            # Per-consumer prefetch (quorum queues ignore the global flag); applies to
            # the consumers started below.
            await self._channel.set_qos(prefetch_count=free)
            for queue in self._queues:
                self._consumer_tags[queue.name] = await queue.consume(self._on_message)
