"""Every RabbitMQ exchange, queue and routing key sandfleet uses, and one idempotent declare().

sandfleet.submit (quorum)  ── gateway consumes; rejects dead-letter to sandfleet.dead
sandfleet.jobs (direct) ── <driver>         → sandfleet.jobs.<driver>         (quorum)
                        └─ <driver>.<host>  → sandfleet.jobs.<driver>.<host>  (quorum)
sandfleet.retry.<key> (quorum): jobs waiting for GPUs; expire back to sandfleet.jobs, <key>
sandfleet.dead (fanout) ─→ sandfleet.dead (quorum): nothing is ever silently lost
sandfleet.events (topic), key <phase>.<driver>.<host> ─ # → sandfleet.events.log (stream)
sandfleet.control (fanout) ─→ sandfleet.control.log (stream): cancellations, read by every
    worker from the start (so a queued job cancelled before any worker saw it never starts)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.abc import FieldTable

from sandfleet.common.settings import Settings

SUBMIT_QUEUE = "sandfleet.submit"
JOBS_EXCHANGE = "sandfleet.jobs"
DEAD_EXCHANGE = "sandfleet.dead"
DEAD_QUEUE = "sandfleet.dead"
EVENTS_EXCHANGE = "sandfleet.events"
EVENTS_LOG_QUEUE = "sandfleet.events.log"
CONTROL_EXCHANGE = "sandfleet.control"
CONTROL_LOG_QUEUE = "sandfleet.control.log"
RETRY_PREFIX = "sandfleet.retry"
RETRY_WAITING_SINCE_HEADER = "x-sandfleet-waiting-since"

EVENTS_MAX_LENGTH_BYTES = 1 << 30

# Marks a message written straight into the event log (not an event) to find its end.
LOG_MARKER_TYPE = "sandfleet.log-marker"


def job_routing_key(driver: str, host: str | None = None) -> str:
    return f"{driver}.{host}" if host else driver


def job_queue_name(driver: str, host: str | None = None) -> str:
    return f"{JOBS_EXCHANGE}.{job_routing_key(driver, host)}"


def retry_queue_name(routing_key: str) -> str:
    """Where a job waits out a retry delay before going back to `routing_key`."""
    return f"{RETRY_PREFIX}.{routing_key}"


def _quorum_args(delivery_limit: int) -> FieldTable:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
    }


@dataclass(frozen=True)
class Topology:
    jobs: AbstractExchange
    events: AbstractExchange
    dead: AbstractExchange
    control: AbstractExchange


async def declare_topology(
    channel: AbstractChannel,
    settings: Settings,
    *,
    job_queues: Iterable[tuple[str, str | None]] = (),
) -> Topology:
    """Declare the whole topology; safe to call from every process, any number of times.

    `job_queues` names the (driver, host) job queues this process serves: workers
    declare theirs, so a job for a driver or host that no worker ever served is
    unroutable and the gateway rejects it instead of parking it forever.

    A job message delivered more than `job_delivery_limit` times is dead-lettered.
    RabbitMQ 3.10 counts every requeue, so "no capacity yet" must be a delayed
    republish, never a requeue.
    """
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(
        DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead)
    quorum = _quorum_args(settings.job_delivery_limit)
    await channel.declare_queue(SUBMIT_QUEUE, durable=True, arguments=quorum)
    jobs = await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    for driver, host in job_queues:
        await _declare_job_queue(channel, jobs, job_routing_key(driver, host), quorum)
    events = await _declare_logged_exchange(
        channel, EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, EVENTS_LOG_QUEUE,
        {"x-max-age": settings.events_max_age, "x-max-length-bytes": EVENTS_MAX_LENGTH_BYTES},
    )  # fmt: skip
    control = await _declare_logged_exchange(
        channel, CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, CONTROL_LOG_QUEUE,
        {"x-max-age": settings.events_max_age},
    )  # fmt: skip
    return Topology(jobs=jobs, events=events, dead=dead, control=control)


async def _declare_job_queue(
    channel: AbstractChannel, jobs: AbstractExchange, routing_key: str, quorum: FieldTable
) -> None:
    """A job queue and its retry queue, whose messages expire back into it."""
    queue = await channel.declare_queue(
        f"{JOBS_EXCHANGE}.{routing_key}", durable=True, arguments=quorum
    )
    await queue.bind(jobs, routing_key=routing_key)
    await channel.declare_queue(
        retry_queue_name(routing_key),
        durable=True,
        arguments={
            # Messages published here with an expiration go back to the job queue
            # when it runs out; at-least-once dead-lettering never drops one.
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": JOBS_EXCHANGE,
            "x-dead-letter-routing-key": routing_key,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


async def _declare_logged_exchange(
    channel: AbstractChannel,
    name: str,
    kind: aio_pika.ExchangeType,
    log_queue: str,
    retention: FieldTable,
) -> AbstractExchange:
    """An exchange whose every message is kept in a stream queue (its log)."""
    exchange = await channel.declare_exchange(name, kind, durable=True)
    log = await channel.declare_queue(
        log_queue, durable=True, arguments={"x-queue-type": "stream", **retention}
    )
    await log.bind(exchange, routing_key="#")
    return exchange
