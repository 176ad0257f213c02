"""Worker heartbeats at a paced rate, as a fleet of that many workers would send them.

    python -m bench.heartbeat_source URL RATE

Publishes valid `heartbeat` events (confirmed, persistent, under their own routing key
`heartbeat.docker.<host>`) to the events exchange, from 1,000 made-up worker hosts, at
RATE a second until stopped (SIGTERM/SIGINT). Every 0.1 s it prints `<confirmed>
<monotonic seconds>` so the bench can tell the rate over any stretch of its run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractExchange

from bench.broker_tools import EVENT_ID_MARK, templated_event
from sandfleet.common.events import HEARTBEAT_ALIVE, Event, Phase, WorkerHealth
from sandfleet.common.topology import declare_topology

WORKERS = 1000
WINDOW = 256  # publishes awaiting their confirms
BACKLOG_LIMIT = 10_000  # behind by more than this, the source skips ahead (and says so)
STARTED = datetime.now(UTC)
TIME_MARK = "TIME-HERE"
TEMPLATE_TIME = datetime(2000, 1, 1, tzinfo=UTC)


class Heartbeats:
    """Heartbeat messages, each a template serialized once per host with a fresh event
    id and timestamp put in (pydantic per message would make the source, not the
    gateway, the bottleneck)."""

    def __init__(self) -> None:
        health = WorkerHealth(slots=8, free_slots=8, started_at=STARTED, heartbeat_seconds=1.0)
        self._templates = []
        for i in range(WORKERS):
            event = Event(
                event_id=EVENT_ID_MARK,
                job_id=None,
                phase=Phase.HEARTBEAT,
                reason=HEARTBEAT_ALIVE,
                driver="docker",
                host=f"hb{i:04d}",
                worker_id=f"hb{i:04d}-worker",
                health=health,
                timestamp=TEMPLATE_TIME,
            )
            stamp = event.model_dump(mode="json")["timestamp"]
            body = event.model_dump_json().replace(
                f'"timestamp":"{stamp}"', f'"timestamp":"{TIME_MARK}"'
            )
            self._templates.append((body, event.routing_key))

    def message(self, i: int) -> tuple[aio_pika.Message, str]:
        template, routing_key = self._templates[i % WORKERS]
        now = datetime.now(UTC).isoformat()
        return templated_event(template, uuid.uuid4().hex, **{TIME_MARK: now}), routing_key


class Pacer:
    def __init__(self, exchange: AbstractExchange, rate: float) -> None:
        self.exchange, self.rate = exchange, rate
        self.confirmed = self.scheduled = 0
        self._gate = asyncio.Semaphore(WINDOW)
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeats = Heartbeats()

    async def _publish(self, i: int) -> None:
        async with self._gate:
            message, routing_key = self._heartbeats.message(i)
            await self.exchange.publish(message, routing_key=routing_key)
            self.confirmed += 1

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        while not stop.is_set():
            due = int(self.rate * (time.monotonic() - started))
            if due - self.confirmed > BACKLOG_LIMIT:
                self.scheduled = due  # cannot keep up: the printed counts show it
            while self.scheduled < due:
                task = asyncio.create_task(self._publish(self.scheduled))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self.scheduled += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.005)
        for task in self._tasks:  # stopped: the confirms still awaited do not count
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def report(self) -> None:
        while True:
            print(self.confirmed, time.monotonic(), flush=True)
            await asyncio.sleep(0.1)


async def flow(url: str, rate: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(connection, channel)
        pacer = Pacer(topology.events, rate)
        reporter = asyncio.create_task(pacer.report())
        await pacer.run(stop)
        reporter.cancel()


if __name__ == "__main__":
    asyncio.run(flow(sys.argv[1], float(sys.argv[2])))
