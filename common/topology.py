"""Every RabbitMQ exchange, queue and routing key sandfleet uses, and one idempotent declare().

sandfleet.submissions (fanout) ─→ sandfleet.submit (quorum): submissions and cancellation
    requests; the gateway consumes; rejects dead-letter to sandfleet.dead
sandfleet.jobs (direct) ── <driver>         → sandfleet.jobs.<driver>         (quorum)
                        └─ <driver>.<host>  → sandfleet.jobs.<driver>.<host>  (quorum)
sandfleet.retry (direct) ── <key> → sandfleet.retry.<key> (quorum): jobs waiting for GPUs;
    they expire back to sandfleet.jobs, <key>
sandfleet.dead (fanout) ─→ sandfleet.dead (quorum): nothing is ever silently lost
sandfleet.events (topic), key <phase>.<driver>.<host> ─ # → sandfleet.events.log (stream)
    (readers of the log also find their `log-marker.<id>` messages there)
sandfleet.logs (topic), key <driver>.<host> ─ # → sandfleet.logs.log (stream): jobs'
    output, in chunks (common.job_logs); readers' markers come in as on sandfleet.events
sandfleet.control (fanout) ─→ sandfleet.control.log (stream): cancellations, read by every
    worker from the start (so a queued job cancelled before any worker saw it never starts)
sandfleet.queries (fanout) ─→ sandfleet.view (classic): questions to the gateways' job
    views (status, jobs, stats); any gateway answers, through direct reply-to

Who may do what on each is sandfleet.common.broker_roles; every publish goes through a
named exchange (never amq.default, which reaches every queue), so the broker's
permissions and topic authorisation decide who writes where.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.exceptions import ChannelNotFoundEntity
from aiormq.abc import FieldTable
from aiormq.exceptions import ChannelAccessRefused

from sandfleet.common.errors import SandfleetError
from sandfleet.common.settings import Settings

SUBMIT_QUEUE = "sandfleet.submit"
SUBMISSIONS_EXCHANGE = "sandfleet.submissions"
JOBS_EXCHANGE = "sandfleet.jobs"
DEAD_EXCHANGE = "sandfleet.dead"
DEAD_QUEUE = "sandfleet.dead"
EVENTS_EXCHANGE = "sandfleet.events"
EVENTS_LOG_QUEUE = "sandfleet.events.log"
LOGS_EXCHANGE = "sandfleet.logs"
LOGS_LOG_QUEUE = "sandfleet.logs.log"
CONTROL_EXCHANGE = "sandfleet.control"
CONTROL_LOG_QUEUE = "sandfleet.control.log"
RETRY_PREFIX = "sandfleet.retry"
RETRY_EXCHANGE = RETRY_PREFIX
RETRY_WAITING_SINCE_HEADER = "x-sandfleet-waiting-since"
QUERIES_EXCHANGE = "sandfleet.queries"
VIEW_QUEUE = "sandfleet.view"
# A question nobody answered within a client's wait is worth nothing: it expires, and
# a flood of them is refused at the door rather than queued.
VIEW_QUERY_TTL_MS = 30_000
VIEW_MAX_LENGTH = 10_000

EVENTS_MAX_LENGTH_BYTES = 1 << 30
DEAD_MAX_LENGTH_BYTES = 1 << 30
# Cancellations are small (a bounded CancelRequest), so this holds millions.
CONTROL_MAX_LENGTH_BYTES = 256 << 20
# Jobs' output: the oldest goes first past this, whatever SANDFLEET_LOGS_MAX_AGE says.
LOGS_MAX_LENGTH_BYTES = 8 << 30

# Message types on sandfleet.submissions.
SUBMIT_TYPE = "sandfleet.submit"
CANCEL_TYPE = "sandfleet.cancel"

# Marks a message written into a log (not an event) to find the log's end. On the events
# exchange a marker's routing key is `log-marker.<id>`: submitters and observers may
# publish those keys and no others, and no event's key starts so (no phase is called so).
LOG_MARKER_TYPE = "sandfleet.log-marker"
LOG_MARKER_KEY_PREFIX = "log-marker."


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
    """Declare the fleet's shared topology (and the `job_queues` named); idempotent.

    The gateway and `sandfleet broker setup` declare it. `job_queues` names (driver,
    host) job queues: workers declare theirs (see `declare_worker_queues`), so a job for
    a driver or host that no worker ever served is unroutable and the gateway rejects
    it instead of parking it forever.

    A job message delivered more than `job_delivery_limit` times is dead-lettered.
    RabbitMQ 3.10 counts every requeue, so "no capacity yet" must be a delayed
    republish, never a requeue.
    """
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(
        DEAD_QUEUE,
        durable=True,
        # Anyone may send what ends here (a bad submission is dead-lettered whole): a cap,
        # the oldest dead letters going first, keeps a flood from filling the disk.
        arguments={
            "x-queue-type": "quorum",
            "x-max-length-bytes": DEAD_MAX_LENGTH_BYTES,
            "x-overflow": "drop-head",
        },
    )
    await dead_queue.bind(dead)
    quorum = _quorum_args(settings.job_delivery_limit)
    submit = await channel.declare_queue(SUBMIT_QUEUE, durable=True, arguments=quorum)
    submissions = await channel.declare_exchange(
        SUBMISSIONS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    await submit.bind(submissions)
    jobs = await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    await channel.declare_exchange(RETRY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    for driver, host in job_queues:
        await declare_job_queue(channel, settings, driver, host)
    events = await _declare_logged_exchange(
        channel, EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, EVENTS_LOG_QUEUE,
        {"x-max-age": settings.events_max_age, "x-max-length-bytes": EVENTS_MAX_LENGTH_BYTES},
    )  # fmt: skip
    control = await _declare_logged_exchange(
        channel, CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, CONTROL_LOG_QUEUE,
        {"x-max-age": settings.events_max_age, "x-max-length-bytes": CONTROL_MAX_LENGTH_BYTES},
    )  # fmt: skip
    await declare_view_queue(channel)
    await _declare_logged_exchange(
        channel, LOGS_EXCHANGE, aio_pika.ExchangeType.TOPIC, LOGS_LOG_QUEUE,
        {"x-max-age": settings.logs_max_age, "x-max-length-bytes": LOGS_MAX_LENGTH_BYTES},
    )  # fmt: skip
    return Topology(jobs=jobs, events=events, dead=dead, control=control)


async def declare_view_queue(channel: AbstractChannel) -> None:
    """sandfleet.queries and the queue the gateways answer it from. Classic, not quorum:
    a query is worth nothing after its asker's timeout, so losing one to a broker
    restart costs a retry, and classic queues expire messages cheaply."""
    queries = await channel.declare_exchange(
        QUERIES_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    view = await channel.declare_queue(
        VIEW_QUEUE,
        durable=True,
        arguments={
            "x-message-ttl": VIEW_QUERY_TTL_MS,
            "x-max-length": VIEW_MAX_LENGTH,
            "x-overflow": "reject-publish",
        },
    )
    await view.bind(queries)


async def existing_topology(channel: AbstractChannel) -> Topology:
    """The shared exchanges, looked up (passive: needs no permission)."""
    jobs, events, dead, control = [
        await channel.get_exchange(name)
        for name in (JOBS_EXCHANGE, EVENTS_EXCHANGE, DEAD_EXCHANGE, CONTROL_EXCHANGE)
    ]
    return Topology(jobs=jobs, events=events, dead=dead, control=control)


async def declare_job_queue(
    channel: AbstractChannel, settings: Settings, driver: str, host: str | None
) -> None:
    """A job queue and its retry queue, whose messages expire back into it."""
    routing_key = job_routing_key(driver, host)
    quorum = _quorum_args(settings.job_delivery_limit)
    queue = await channel.declare_queue(
        job_queue_name(driver, host), durable=True, arguments=quorum
    )
    await queue.bind(JOBS_EXCHANGE, routing_key=routing_key)
    retry = await channel.declare_queue(
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
    await retry.bind(RETRY_EXCHANGE, routing_key=routing_key)


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


class TopologyUndeclared(SandfleetError):
    """A process's broker account may not declare a part of the topology nobody has yet."""


async def declare_worker_queues(
    connection: AbstractConnection, settings: Settings, *, driver: str, host: str
) -> None:
    """Whatever of a worker's topology nobody has declared yet: the shared topology, its
    driver's shared queue, its host's job queue (with its retry queue).

    `sandfleet broker setup` declares all of them, and a worker's own broker account may
    declare none (declaring means binding, and a worker allowed to bind could bind its
    queue to another host's jobs). On a broker where nothing is declared yet and the
    account may (a development broker's guest), the worker declares them itself, so start
    order does not matter.
    """
    async with connection.channel() as channel:
        try:
            # The log stream is the newest part: a broker set up before it gets it too.
            if not await _exists(connection, LOGS_LOG_QUEUE):
                await declare_topology(channel, settings)
            for queue_host in (None, host):
                if not await _exists(connection, job_queue_name(driver, queue_host)):
                    await declare_job_queue(channel, settings, driver, queue_host)
        except ChannelAccessRefused as exc:
            raise TopologyUndeclared(
                f"the broker refused to let this worker declare its queues ({exc.args[-1]}); "
                f"`sandfleet broker setup --host {host} --driver {driver}` declares them"
            ) from None


async def _exists(connection: AbstractConnection, queue: str) -> bool:
    # A passive declare of a missing queue closes its channel: a throwaway one.
    async with connection.channel() as probe:
        try:
            await probe.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return False
    return True
