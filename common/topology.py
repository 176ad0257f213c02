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
sandfleet.queries (fanout) ─→ sandfleet.view (quorum): questions to the gateways' job
    views (status, jobs, stats); any gateway answers, through direct reply-to

Their limits (delivery limit, the logs' retention, the dead and view queues' caps) are
policies that `sandfleet broker setup` puts (sandfleet.common.queue_policies), not
arguments, so an operator may change them on a live fleet.

Who may do what on each is sandfleet.common.broker_roles; every publish goes through a
named exchange (never amq.default, which reaches every queue), so the broker's
permissions and topic authorisation decide who writes where.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity
from aiormq.abc import FieldTable
from aiormq.exceptions import ChannelAccessRefused

from sandfleet.common.errors import SandfleetError
from sandfleet.common.events import JOB_PHASES, Phase

SUBMIT_QUEUE = "sandfleet.submit"
SUBMISSIONS_EXCHANGE = "sandfleet.submissions"
JOBS_EXCHANGE = "sandfleet.jobs"
DEAD_EXCHANGE = "sandfleet.dead"
DEAD_QUEUE = "sandfleet.dead"
EVENTS_EXCHANGE = "sandfleet.events"
EVENTS_LOG_QUEUE = "sandfleet.events.log"
# Workers' heartbeats have a log of their own: the gateway follows the event log for the
# jobs' events, and a fleet's heartbeats (one per worker every few seconds, carrying its
# GPU inventory) would make every gateway's cost grow with the fleet's size.
HEARTBEATS_LOG_QUEUE = "sandfleet.heartbeats.log"
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
# Heartbeats say how the fleet is now: an hour of them is plenty for `top --since` and
# `workers`, and the size cap bounds a big fleet's (1,000 workers: ~4 GiB a day).
HEARTBEATS_MAX_AGE = "1h"
HEARTBEATS_MAX_LENGTH_BYTES = 512 << 20
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


# Replicas for a cluster: RabbitMQ caps each at the cluster's size, so one node works too.
QUORUM_REPLICAS = 3
STREAM_REPLICAS = 3

# Only what the code's correctness rests on is a queue argument, fixed at declaration;
# the limits an operator may tune are policies (common.queue_policies).
QUORUM_ARGS: FieldTable = {
    "x-queue-type": "quorum",
    "x-quorum-initial-group-size": QUORUM_REPLICAS,
}
STREAM_ARGS: FieldTable = {"x-queue-type": "stream", "x-initial-cluster-size": STREAM_REPLICAS}
# A message the gateway or a worker rejects (or one past the delivery limit) must end in
# sandfleet.dead, never vanish.
DEAD_LETTERED_QUORUM_ARGS: FieldTable = {**QUORUM_ARGS, "x-dead-letter-exchange": DEAD_EXCHANGE}


@dataclass(frozen=True)
class Topology:
    jobs: AbstractExchange
    events: AbstractExchange
    dead: AbstractExchange
    control: AbstractExchange


async def declare_topology(
    connection: AbstractConnection,
    channel: AbstractChannel,
    *,
    job_queues: Iterable[tuple[str, str | None]] = (),
) -> Topology:
    """Declare the fleet's shared topology (and the `job_queues` named) on `channel`;
    idempotent. A queue is declared only if missing (see `_queue`).

    The gateway and `sandfleet broker setup` declare it. `job_queues` names (driver,
    host) job queues: workers declare theirs (see `declare_worker_queues`), so a job for
    a driver or host that no worker ever served is unroutable and the gateway rejects
    it instead of parking it forever.

    A job message delivered more than the delivery limit's times (the sandfleet-intake
    policy) is dead-lettered. RabbitMQ 3.10 counts every requeue, so "no capacity yet"
    must be a delayed republish, never a requeue.
    """
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    # Anyone may send what ends here (a bad submission is dead-lettered whole): a cap (a
    # policy), the oldest dead letters going first, keeps a flood from filling the disk.
    dead_args = {**QUORUM_ARGS, "x-overflow": "drop-head"}
    await (await _queue(connection, channel, DEAD_QUEUE, dead_args)).bind(dead)
    submit = await _queue(connection, channel, SUBMIT_QUEUE, DEAD_LETTERED_QUORUM_ARGS)
    submissions = await channel.declare_exchange(
        SUBMISSIONS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    await submit.bind(submissions)
    jobs = await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    await channel.declare_exchange(RETRY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    for driver, host in job_queues:
        await declare_job_queue(connection, channel, driver, host)
    events = await _declare_events_exchange(connection, channel)
    control = await _declare_logged_exchange(
        connection, channel, CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, CONTROL_LOG_QUEUE
    )
    await declare_view_queue(connection, channel)
    await _declare_logged_exchange(
        connection, channel, LOGS_EXCHANGE, aio_pika.ExchangeType.TOPIC, LOGS_LOG_QUEUE
    )
    return Topology(jobs=jobs, events=events, dead=dead, control=control)


async def declare_view_queue(connection: AbstractConnection, channel: AbstractChannel) -> None:
    """sandfleet.queries and the queue the gateways answer it from. Quorum, like every
    queue a gateway consumes: a classic queue lives on one node, and with that node
    lost no gateway could consume it again (aio-pika's reconnection would fail on it
    for as long as the node is away, taking the gateway's whole connection down)."""
    queries = await channel.declare_exchange(
        QUERIES_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    view_args: FieldTable = {
        **QUORUM_ARGS,
        "x-message-ttl": VIEW_QUERY_TTL_MS,
        # Past the length cap (a policy) a question is refused to its asker at once,
        # not dropped for it to wait out its timeout.
        "x-overflow": "reject-publish",
    }
    await (await _queue(connection, channel, VIEW_QUEUE, view_args)).bind(queries)


async def existing_topology(channel: AbstractChannel) -> Topology:
    """The shared exchanges, looked up (passive: needs no permission)."""
    jobs, events, dead, control = [
        await channel.get_exchange(name)
        for name in (JOBS_EXCHANGE, EVENTS_EXCHANGE, DEAD_EXCHANGE, CONTROL_EXCHANGE)
    ]
    return Topology(jobs=jobs, events=events, dead=dead, control=control)


async def declare_job_queue(
    connection: AbstractConnection, channel: AbstractChannel, driver: str, host: str | None
) -> None:
    """A job queue and its retry queue, whose messages expire back into it."""
    routing_key = job_routing_key(driver, host)
    name = job_queue_name(driver, host)
    queue = await _queue(connection, channel, name, DEAD_LETTERED_QUORUM_ARGS)
    await queue.bind(JOBS_EXCHANGE, routing_key=routing_key)
    retry_args: FieldTable = {
        **QUORUM_ARGS,
        # Messages published here with an expiration go back to the job queue
        # when it runs out; at-least-once dead-lettering never drops one.
        "x-dead-letter-exchange": JOBS_EXCHANGE,
        "x-dead-letter-routing-key": routing_key,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    retry = await _queue(connection, channel, retry_queue_name(routing_key), retry_args)
    await retry.bind(RETRY_EXCHANGE, routing_key=routing_key)


async def _declare_logged_exchange(
    connection: AbstractConnection,
    channel: AbstractChannel,
    name: str,
    kind: aio_pika.ExchangeType,
    log_queue: str,
) -> AbstractExchange:
    """An exchange whose every message is kept in a stream queue (its log); its
    retention is a policy."""
    exchange = await channel.declare_exchange(name, kind, durable=True)
    log = await _queue(connection, channel, log_queue, STREAM_ARGS)
    await log.bind(exchange, routing_key="#")
    return exchange


def event_log_keys() -> list[str]:
    """The routing keys (topic patterns) the event log is bound to: every job phase's
    events and the markers that find the log's end; not heartbeats."""
    keys = [f"{phase.value}.#" for phase in Phase if phase in JOB_PHASES]  # in Phase's order
    return [*keys, f"{LOG_MARKER_KEY_PREFIX}#"]


def heartbeat_log_keys() -> list[str]:
    """The routing keys the heartbeat log is bound to: heartbeats, and the markers."""
    return [f"{Phase.HEARTBEAT.value}.#", f"{LOG_MARKER_KEY_PREFIX}#"]


async def _declare_events_exchange(
    connection: AbstractConnection, channel: AbstractChannel
) -> AbstractExchange:
    """sandfleet.events and its two logs: the jobs' events, and the heartbeats."""
    exchange = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    # The heartbeat log first: an account set up by an older release may not declare it
    # (run this release's `broker setup` first), and until it exists the event log must
    # keep the heartbeats it took before.
    try:
        beats = await _queue(connection, channel, HEARTBEATS_LOG_QUEUE, STREAM_ARGS)
        for key in heartbeat_log_keys():
            await beats.bind(exchange, routing_key=key)
    except ChannelAccessRefused as exc:
        raise TopologyUndeclared(
            f"the broker refused {HEARTBEATS_LOG_QUEUE} to this account ({exc.args[-1]}): "
            "set up by an older release? Run this release's `sandfleet broker setup` first"
        ) from None
    log = await _queue(connection, channel, EVENTS_LOG_QUEUE, STREAM_ARGS)
    for key in event_log_keys():
        await log.bind(exchange, routing_key=key)
    # A fleet set up by an older release bound the event log to everything (heartbeats
    # too); unbinding a binding that is not there is no error.
    await log.unbind(exchange, routing_key="#")
    return exchange


async def _queue(
    connection: AbstractConnection, channel: AbstractChannel, name: str, arguments: FieldTable
) -> AbstractQueue:
    """The durable queue `name`, declared with `arguments` only if it is missing.

    A queue that exists is left as it is: one declared by an older release with other
    arguments (limits that are policies now, or none of the replica counts) would refuse
    a declaration with these (406) and close the channel, and a fleet must upgrade
    without deleting its queues."""
    if await _exists(connection, name):
        return await channel.get_queue(name, ensure=False)
    return await channel.declare_queue(name, durable=True, arguments=arguments)


class TopologyUndeclared(SandfleetError):
    """A process's broker account may not declare a part of the topology nobody has yet."""


async def declare_worker_queues(connection: AbstractConnection, *, driver: str, host: str) -> None:
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
            # The heartbeat log is the newest part: a broker set up before it gets it too.
            if not await _exists(connection, HEARTBEATS_LOG_QUEUE):
                await declare_topology(connection, channel)
            for queue_host in (None, host):
                if not await _exists(connection, job_queue_name(driver, queue_host)):
                    await declare_job_queue(connection, channel, driver, queue_host)
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
