"""Fills a vhost's event log with N events, fast: a fleet's history to start a gateway on.

Nine in ten are job events (each job `accepted` by a gateway, then `starting`,
`running` and `succeeded` on a worker: a quarter of those as many distinct job ids),
one in ten a worker heartbeat. Each is a valid event under its own routing key, made
from a template serialized once (pydantic per message would make the filling, not the
broker, the bottleneck), and published confirmed with a window in flight.
"""

from __future__ import annotations

import sys
import time
import uuid
from datetime import UTC, datetime

import aio_pika

from bench.broker_tools import EVENT_ID_MARK, templated_event, windowed
from sandfleet.common.events import HEARTBEAT_ALIVE, Event, Phase, WorkerHealth
from sandfleet.common.topology import declare_topology

JOB_PHASES = (Phase.ACCEPTED, Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED)
HEARTBEAT_EVERY = 10
JOB_MARK = "JOB-ID-HERE"


def _event(phase: Phase) -> Event:
    if phase is Phase.HEARTBEAT:
        health = WorkerHealth(
            slots=8, free_slots=8, started_at=datetime.now(UTC), heartbeat_seconds=10.0
        )
        return Event(event_id=EVENT_ID_MARK, job_id=None, phase=phase, reason=HEARTBEAT_ALIVE,
                     driver="docker", host="fillworker", worker_id="fillworker-1",
                     health=health)  # fmt: skip
    if phase is Phase.ACCEPTED:
        return Event(event_id=EVENT_ID_MARK, job_id=JOB_MARK, phase=phase, reason="Accepted",
                     driver="docker", host="fillgw", submitted_by="guest", labels={})  # fmt: skip
    done = {"exit_code": 0, "timings": {"queued": 0.1, "running": 1.0}}
    return Event(event_id=EVENT_ID_MARK, job_id=JOB_MARK, phase=phase, reason=phase.value.title(),
                 driver="docker", host="fillworker", worker_id="fillworker-1",
                 **(done if phase is Phase.SUCCEEDED else {}))  # fmt: skip


class EventTemplates:
    """The i-th event of the fill, as (body, routing key), without pydantic per message."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:6]
        self._templates = {
            phase: (_event(phase).model_dump_json(), _event(phase).routing_key)
            for phase in (*JOB_PHASES, Phase.HEARTBEAT)
        }

    def message(self, i: int) -> tuple[aio_pika.Message, str]:
        if i % HEARTBEAT_EVERY == HEARTBEAT_EVERY - 1:
            phase, job_id = Phase.HEARTBEAT, ""
        else:
            job_event = i - i // HEARTBEAT_EVERY
            phase = JOB_PHASES[job_event % len(JOB_PHASES)]
            job_id = f"fill-{self.run}-{job_event // len(JOB_PHASES):07d}"
        template, routing_key = self._templates[phase]
        return templated_event(template, uuid.uuid4().hex, **{JOB_MARK: job_id}), routing_key


async def fill(url: str, n: int, window: int) -> float:
    """Publish the fill's `n` events to the events exchange; the rate achieved, per second."""
    templates = EventTemplates()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        events = (await declare_topology(connection, channel)).events
        step = max(1, n // 10)

        async def publish(i: int) -> None:
            message, routing_key = templates.message(i)
            await events.publish(message, routing_key=routing_key)
            if (i + 1) % step == 0:
                print(f"  event log: {i + 1:,} of {n:,} events", file=sys.stderr, flush=True)

        started = time.perf_counter()
        await windowed(n, window, publish)
        elapsed = time.perf_counter() - started
    return n / elapsed
