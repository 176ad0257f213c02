"""The queues' limits are policies (common.queue_policies): in force on the live queues,
changed by running `broker setup` again, and a fleet declared by a release that had them
as queue arguments keeps working."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

import sandfleet
from sandfleet.common.broker_urls import vhost_of
from sandfleet.common.events import Phase
from sandfleet.common.queue_policies import fleet_policies
from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    CONTROL_EXCHANGE,
    CONTROL_LOG_QUEUE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    EVENTS_LOG_QUEUE,
    HEARTBEATS_LOG_QUEUE,
    JOBS_EXCHANGE,
    LOGS_EXCHANGE,
    LOGS_LOG_QUEUE,
    QUERIES_EXCHANGE,
    RETRY_EXCHANGE,
    SUBMISSIONS_EXCHANGE,
    SUBMIT_QUEUE,
    VIEW_QUEUE,
    declare_job_queue,
    job_queue_name,
    job_routing_key,
    retry_queue_name,
)
from sandfleet.gateway.broker_setup import DEFAULT_ADMIN_URL, CredentialsFile, set_up_broker
from sandfleet.gateway.service import Gateway
from tests.support import eventually
from tests.support.broker import managed_queue, rabbitmqctl
from tests.support.runtimes import registered_driver, worker_factory

pytestmark = pytest.mark.integration

STREAMS = (EVENTS_LOG_QUEUE, HEARTBEATS_LOG_QUEUE, CONTROL_LOG_QUEUE, LOGS_LOG_QUEUE)


async def until_policy(settings: Settings, queue: str, key: str, value: object) -> dict[str, Any]:
    """The queue as the management API shows it, once its effective policy has `key` at
    `value` (the API's statistics lag the broker)."""
    found: dict[str, Any] = {}

    async def in_effect() -> bool:
        found.update(await managed_queue(settings.broker_url, queue))
        return (found.get("effective_policy_definition") or {}).get(key) == value

    await eventually(in_effect, timeout=30, interval=0.5)
    return found


async def test_every_queue_has_its_policy_in_force_and_asks_for_three_replicas(
    settings: Settings, gateway: Gateway
) -> None:
    """The test vhost has broker setup's policies (conftest); the queues carry none of the
    limits as arguments, and ask for three replicas, which one node caps to itself."""
    async with await aio_pika.connect(settings.broker_url) as connection:
        await declare_job_queue(connection, await connection.channel(), "inmemory", "h1")
    queues = [SUBMIT_QUEUE, job_queue_name("inmemory", "h1"), retry_queue_name("inmemory.h1"),
              DEAD_QUEUE, VIEW_QUEUE, *STREAMS]  # fmt: skip
    for queue in queues:
        [policy] = [p for p in fleet_policies(settings) if re.search(p.pattern, queue)]
        key, value = next(iter(policy.definition.items()))
        found = await until_policy(settings, queue, key, value)
        assert (found["policy"], found["effective_policy_definition"]) == (
            policy.name,
            policy.definition,
        )
        arguments = found["arguments"]
        assert not {"x-delivery-limit", "x-max-age", "x-max-length", "x-max-length-bytes"} & set(
            arguments
        ), (queue, arguments)
        if queue in STREAMS:
            assert arguments["x-initial-cluster-size"] == 3
        elif queue != VIEW_QUEUE:
            assert arguments["x-quorum-initial-group-size"] == 3
            assert len(found["members"]) == 1  # this one node


async def test_running_setup_again_changes_the_live_delivery_limit(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """No 406 for the queues declared with the old limit, and a message that keeps
    failing is dead-lettered after the new limit's deliveries."""
    credentials = CredentialsFile(tmp_path / "broker-users.json")
    for limit in (5, 2):
        users = await set_up_broker(
            make_settings(job_delivery_limit=limit),
            admin_url=DEFAULT_ADMIN_URL,
            credentials=credentials,
            drivers=["inmemory"],
        )
    settings = make_settings(job_delivery_limit=2)
    await until_policy(settings, job_queue_name("inmemory"), "delivery-limit", 2)
    deliveries = await deliveries_until_dead_lettered(users.admin, job_queue_name("inmemory"))
    assert deliveries == 3  # the first and two redeliveries


async def deliveries_until_dead_lettered(url: str, queue_name: str) -> int:
    """Publish a message to `queue_name` and requeue it each time it comes, until it
    reaches sandfleet.dead: how many times it came."""
    deliveries = 0

    async def requeue(message: AbstractIncomingMessage) -> None:
        nonlocal deliveries
        deliveries += 1
        await message.nack(requeue=True)

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        body = uuid.uuid4().bytes
        jobs = await channel.get_exchange(JOBS_EXCHANGE)
        await jobs.publish(aio_pika.Message(body), routing_key=queue_name.rpartition(".")[2])
        await (await channel.declare_queue(queue_name, passive=True)).consume(requeue)
        async with asyncio.timeout(30), dead.iterator() as dead_letters:
            async for letter in dead_letters:
                await letter.ack()
                if letter.body == body:
                    return deliveries
    raise AssertionError("never dead-lettered")


async def declare_as_the_old_release_did(url: str, driver: str, host: str) -> None:
    """The queues with the limits as arguments, bound as sandfleet declared them before
    the limits were policies (hand-written: that code is gone)."""
    key = job_routing_key(driver, host)
    quorum = {"x-queue-type": "quorum", "x-delivery-limit": 5,
              "x-dead-letter-exchange": DEAD_EXCHANGE}  # fmt: skip
    retry = {"x-queue-type": "quorum", "x-dead-letter-exchange": JOBS_EXCHANGE,
             "x-dead-letter-routing-key": key, "x-dead-letter-strategy": "at-least-once",
             "x-overflow": "reject-publish"}  # fmt: skip

    def stream(max_length_bytes: int) -> dict[str, Any]:
        return {"x-queue-type": "stream", "x-max-age": "7D", "x-max-length-bytes": max_length_bytes}

    fanout, direct, topic = (aio_pika.ExchangeType.FANOUT, aio_pika.ExchangeType.DIRECT,
                             aio_pika.ExchangeType.TOPIC)  # fmt: skip
    # queue: (its arguments, the exchange it is bound to, that exchange's type, the key)
    queues: dict[str, tuple[dict[str, Any], str, aio_pika.ExchangeType, str]] = {
        DEAD_QUEUE: ({"x-queue-type": "quorum", "x-max-length-bytes": 1 << 30,
                      "x-overflow": "drop-head"}, DEAD_EXCHANGE, fanout, ""),
        SUBMIT_QUEUE: (quorum, SUBMISSIONS_EXCHANGE, fanout, ""),
        job_queue_name(driver): (quorum, JOBS_EXCHANGE, direct, driver),
        job_queue_name(driver, host): (quorum, JOBS_EXCHANGE, direct, key),
        retry_queue_name(key): (retry, RETRY_EXCHANGE, direct, key),
        EVENTS_LOG_QUEUE: (stream(1 << 30), EVENTS_EXCHANGE, topic, "#"),
        CONTROL_LOG_QUEUE: (stream(256 << 20), CONTROL_EXCHANGE, fanout, "#"),
        LOGS_LOG_QUEUE: (stream(8 << 30), LOGS_EXCHANGE, topic, "#"),
        VIEW_QUEUE: ({"x-message-ttl": 30_000, "x-max-length": 10_000,
                      "x-overflow": "reject-publish"}, QUERIES_EXCHANGE, fanout, ""),
    }  # fmt: skip
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for name, (arguments, exchange, kind, routing_key) in queues.items():
            bound_to = await channel.declare_exchange(exchange, kind, durable=True)
            queue = await channel.declare_queue(name, durable=True, arguments=arguments)
            await queue.bind(bound_to, routing_key=routing_key)


async def test_a_fleet_whose_queues_the_old_release_declared_keeps_working(
    settings: Settings,
) -> None:
    await declare_as_the_old_release_did(settings.broker_url, "inmemory", settings.host)
    start = worker_factory(settings, registered_driver("inmemory"))
    request = {
        "job_id": f"old-{uuid.uuid4().hex[:8]}",
        "driver": "inmemory",
        "template": {"image": "none", "command": ["true"], "driver_config": {"inmemory": {}}},
    }
    async with Gateway(settings), start(), sandfleet.Client(settings=settings) as client:
        done = await client.run(request, timeout=60)
    assert done.phase is Phase.SUCCEEDED
    # The old release bound the event log to everything; heartbeats now leave it alone.
    listed = await asyncio.to_thread(
        rabbitmqctl, "list_bindings", "-p", vhost_of(settings.broker_url),
        "source_name", "destination_name", "routing_key",
    )  # fmt: skip
    keys = {tuple(line.split("\t")[1:]) for line in listed.splitlines() if "\t" in line}
    assert (EVENTS_LOG_QUEUE, "#") not in keys
    assert (EVENTS_LOG_QUEUE, "heartbeat.#") not in keys
    assert (HEARTBEATS_LOG_QUEUE, "heartbeat.#") in keys
    assert (EVENTS_LOG_QUEUE, "running.#") in keys
