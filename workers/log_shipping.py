"""Shipping jobs' output to the log stream while they run (see common.job_logs).

Each job's output is read from its driver's `follow_output` into a bounded buffer and
published from it by a task of its own, over a connection of its own: a job printing
flat out fills its buffer and then waits (the runtime keeps what it printed meanwhile),
and never delays the worker's events or its other jobs. The sender takes whatever the
buffer holds in one message, so batches grow by themselves under load and a lone line
goes out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from aio_pika.abc import AbstractExchange

from sandfleet.common.amqp import publish_through_outages
from sandfleet.common.job_logs import OutputCap, log_message

log = logging.getLogger(__name__)

BUFFER_BYTES = 1 << 20  # a job's output read ahead of what is published
BATCH_BYTES = 256 << 10  # the most one message holds
# How long one batch waits for the broker to come back before it is given up (logged).
OUTAGE_RETRY_SECONDS = 60.0
# Once a job has ended, how long its shipping may go without reading anything more
# before it is cut off (a runtime that never closes the stream); a backlog still
# moving is shipped to its end.
END_IDLE_SECONDS = 10.0
# However much is still moving, an ended job's output stops being shipped after this.
END_DEADLINE_SECONDS = 120.0


class OutputBuffer:
    """Bytes between a reader and a sender, at most `limit` of them held."""

    def __init__(self, limit: int = BUFFER_BYTES) -> None:
        self._data = bytearray()
        self._limit = limit
        self._closed = False
        self._changed = asyncio.Condition()

    async def put(self, chunk: bytes) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._data) < self._limit)
            self._data += chunk
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def take(self, most: int = BATCH_BYTES) -> bytes | None:
        """Up to `most` bytes, waiting for some; None once closed and empty."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._data) or self._closed)
            batch = bytes(self._data[:most])
            del self._data[:most]
            self._changed.notify_all()
            return batch or None


class OutputShipping(Protocol):
    """Where a worker's job runner sends its jobs' output (LogShipper)."""

    def begin(self, job_id: str, output: AsyncIterator[bytes]) -> None: ...
    async def end(self, job_id: str) -> None: ...


@dataclass
class _Shipment:
    job_id: str
    buffer: OutputBuffer = field(default_factory=OutputBuffer)
    sequence: int = 0
    read_bytes: int = 0  # of its output, so far
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def _while_moving(shipment: _Shipment, idle_seconds: float, deadline_seconds: float) -> None:
    """Wait for a shipment's tasks while they move (output read or sent); cancel them
    once they have not for `idle_seconds`, or after `deadline_seconds` in all: a sandbox
    still running when its job ended (a stop that failed) may trickle output forever,
    and its job must still end."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline_seconds
    while True:
        before = (shipment.read_bytes, shipment.sequence)
        wait = max(0.0, min(idle_seconds, until - loop.time()))
        _, late = await asyncio.wait(shipment.tasks, timeout=wait)
        if not late:
            return
        if (shipment.read_bytes, shipment.sequence) == before or loop.time() >= until:
            for task in late:
                task.cancel()
            return


class LogShipper:
    """Ships each job's output under `routing_key` (`<driver>.<host>`)."""

    def __init__(self, exchange: AbstractExchange, *, routing_key: str, max_bytes_per_job: int):
        self._exchange = exchange
        self._routing_key = routing_key
        self._max_bytes = max_bytes_per_job
        self._shipments: dict[str, _Shipment] = {}

    def begin(self, job_id: str, output: AsyncIterator[bytes]) -> None:
        """Start shipping `output` (a sandbox's, from its start) as job `job_id`'s."""
        if job_id in self._shipments:
            return
        shipment = self._shipments[job_id] = _Shipment(job_id)
        shipment.tasks = [
            asyncio.create_task(self._read(shipment, output)),
            asyncio.create_task(self._send(shipment)),
        ]

    async def end(
        self,
        job_id: str,
        *,
        idle_seconds: float = END_IDLE_SECONDS,
        deadline_seconds: float = END_DEADLINE_SECONDS,
    ) -> None:
        """Ship the rest of an ended job's output, then its end-of-log message; a job
        whose output was never shipped gets the end-of-log message alone."""
        shipment = self._shipments.pop(job_id, None) or _Shipment(job_id)
        if shipment.tasks:
            await _while_moving(shipment, idle_seconds, deadline_seconds)
            await asyncio.gather(*shipment.tasks, return_exceptions=True)
        await self._publish(shipment, b"", end=True)

    async def aclose(self) -> None:
        for shipment in self._shipments.values():
            for task in shipment.tasks:
                task.cancel()
        await asyncio.gather(
            *(t for s in self._shipments.values() for t in s.tasks), return_exceptions=True
        )
        self._shipments.clear()

    async def _read(self, shipment: _Shipment, output: AsyncIterator[bytes]) -> None:
        cap = OutputCap(self._max_bytes)
        try:
            async for chunk in output:
                shipment.read_bytes += len(chunk)
                await shipment.buffer.put(cap.admit(chunk))
                if cap.reached:
                    break  # stop reading: what the runtime keeps is not shipped
        except Exception:
            log.warning("job %s: reading its output failed", shipment.job_id, exc_info=True)
        finally:
            await shipment.buffer.close()
            if isinstance(output, AsyncGenerator):  # close the runtime's stream now
                with contextlib.suppress(Exception):
                    await output.aclose()

    async def _send(self, shipment: _Shipment) -> None:
        while (batch := await shipment.buffer.take()) is not None:
            await self._publish(shipment, batch)

    async def _publish(self, shipment: _Shipment, body: bytes, *, end: bool = False) -> None:
        message = log_message(shipment.job_id, shipment.sequence, body, end=end)
        shipment.sequence += 1
        try:
            # Through a lost node or a broker restart (the connection comes back, on
            # another node of a cluster); output past the buffer waits, it is not lost.
            await publish_through_outages(
                lambda: self._exchange.publish(message, routing_key=self._routing_key),
                what=f"job {shipment.job_id}'s output",
                retry_seconds=OUTAGE_RETRY_SECONDS,
            )
        except Exception:  # the job runs on without its log; never fail it for one
            log.warning("job %s: shipping its output failed", shipment.job_id, exc_info=True)
