"""Gateways at scale against a real broker: several gateways on one submission queue
queue each job id once (the event log decides which `accepted` took it), and the fleet's
heartbeats never reach a gateway (they have a log of their own)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

import sandfleet
from sandfleet.common.amqp import broker_login, json_message
from sandfleet.common.events import Event, Phase, WorkerHealth
from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    EVENTS_EXCHANGE,
    SUBMISSIONS_EXCHANGE,
    declare_topology,
    job_queue_name,
)
from sandfleet.gateway.job_index import PREFETCH as JOB_INDEX_PREFETCH
from sandfleet.gateway.service import Gateway
from tests.support import eventually
from tests.support.metrics import scraped

pytestmark = pytest.mark.integration

IDS = 40
COPIES = 4


def request(job_id: str, host: str) -> bytes:
    return json.dumps({
        "job_id": job_id, "driver": "docker", "placement": {"host": host},
        "template": {"image": "busybox", "command": ["true"]},
    }).encode()  # fmt: skip


async def submit_all(
    channel: AbstractChannel, url: str, bodies: list[bytes]
) -> list[dict[str, Any]]:
    """Publish every body to sandfleet.submit at once; every reply, in publish order."""
    replies = await channel.declare_queue(exclusive=True)
    answers: dict[str, asyncio.Future[bytes]] = {}
    loop = asyncio.get_running_loop()
    for n in range(len(bodies)):
        answers[str(n)] = loop.create_future()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        answers[message.correlation_id or ""].set_result(message.body)

    await replies.consume(on_reply, no_ack=True)
    submissions = await channel.get_exchange(SUBMISSIONS_EXCHANGE)
    for n, body in enumerate(bodies):
        message = aio_pika.Message(
            body, correlation_id=str(n), reply_to=replies.name, user_id=broker_login(url)
        )
        await submissions.publish(message, routing_key="")
    async with asyncio.timeout(120):
        return [json.loads(await answers[str(n)]) for n in range(len(bodies))]


async def queued_ids(channel: AbstractChannel, queue_name: str) -> Counter[str]:
    """How many times each job id sits in `queue_name` (its messages' ids)."""
    queue = await channel.declare_queue(queue_name, passive=True)
    found: Counter[str] = Counter()
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        found[message.message_id or ""] += 1
    return found


async def test_twins_sent_to_two_gateways_are_queued_once(
    make_settings: Callable[..., Settings],
) -> None:
    # Before: each gateway reserved an id in its own memory only, so a twin that
    # reached the other gateway at the same moment was queued (and run) twice.
    first, second = make_settings(), make_settings()
    host = f"h{uuid.uuid4().hex[:8]}"
    ids = [f"twin-{n}-{uuid.uuid4().hex[:6]}" for n in range(IDS)]
    # Each id's copies next to each other: the queue hands them to both gateways in turn.
    bodies = [request(job_id, host) for job_id in ids for _ in range(COPIES)]
    connection = await aio_pika.connect(first.broker_url)
    async with connection, Gateway(first) as one, Gateway(second) as other:
        channel = await connection.channel()
        await declare_topology(connection, channel, job_queues=[("docker", host)])
        replies = await submit_all(channel, first.broker_url, bodies)
        queued = await queued_ids(channel, job_queue_name("docker", host))
        answered_by = one.metrics, other.metrics
    assert queued == Counter(ids)  # every id queued, and once
    assert {reply["status"] for reply in replies} == {"accepted"}
    firsts = Counter(reply["job_id"] for reply in replies if not reply.get("duplicate"))
    assert firsts == Counter(ids)  # one answer per id says it is new; the others, duplicate
    # Both gateways answered submissions (else this proves nothing of two).
    answered = [
        sum(value for (name, _), value in scraped(metrics.registry).items()
            if name == "sandfleet_submissions_total")
        for metrics in answered_by
    ]  # fmt: skip
    assert all(count > 0 for count in answered) and sum(answered) == len(bodies), answered


def heartbeat(host: str) -> Event:
    health = WorkerHealth(
        slots=1, free_slots=1, started_at=Event(job_id=None, phase=Phase.HEARTBEAT, host=host)
        .timestamp, heartbeat_seconds=1.0,
    )  # fmt: skip
    return Event(job_id=None, phase=Phase.HEARTBEAT, driver="docker", host=host, health=health)


async def test_a_heartbeat_storm_never_reaches_the_gateway(
    gateway: Gateway, settings: Settings
) -> None:
    index = gateway.jobs
    assert index is not None
    read, skipped, applied = index.read, index.skipped, gateway.view.applied
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        events = await (await connection.channel()).get_exchange(EVENTS_EXCHANGE)
        for n in range(2000):
            beat = heartbeat(f"w{n % 20}")
            await events.publish(json_message(beat), routing_key=beat.routing_key)
        # One job event after them: once the gateway has it, it has read past them all.
        job = Event(job_id=f"after-{uuid.uuid4().hex[:6]}", phase=Phase.ACCEPTED, host="gw",
                    driver="docker", submitted_by="guest")  # fmt: skip
        await events.publish(json_message(job), routing_key=job.routing_key)

        async def seen() -> bool:
            return index.existing(job.job_id or "") is Phase.ACCEPTED

        await eventually(seen, timeout=60)
    assert index.skipped - skipped == 0  # not even delivered: not in the event log
    assert index.read - read == 1  # the job's event alone
    await gateway.view.flushed()
    assert gateway.view.applied - applied == 1
    # ...and in the heartbeat log, where `workers`, top and gpus --fleet read them.
    beats = Counter[str]()
    async with (
        sandfleet.Client(settings.broker_url) as client,
        client.events(phases={Phase.HEARTBEAT}, from_start=True) as stream,
    ):
        async for beat in stream.history():
            beats[beat.host] += 1
    assert beats == Counter({f"w{n}": 100 for n in range(20)})


async def publish_events(url: str, events: list[Event]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        for event in events:
            await exchange.publish(json_message(event), routing_key=event.routing_key)


def ended_job(job_id: str) -> list[Event]:
    fields: dict[str, Any] = {"job_id": job_id, "driver": "docker"}
    return [
        Event(phase=Phase.ACCEPTED, host="gw", submitted_by="guest", **fields),
        Event(phase=Phase.SUCCEEDED, host="w1", worker_id="w1-1", exit_code=0, **fields),
    ]


async def test_a_restarted_gateway_reads_only_what_was_logged_since(settings: Settings) -> None:
    before = [f"old-{n}-{uuid.uuid4().hex[:6]}" for n in range(200)]
    async with Gateway(settings) as first:
        await publish_events(settings.broker_url, [e for j in before for e in ended_job(j)])
        index = first.jobs
        assert index is not None

        async def all_read() -> bool:
            return index.existing(before[-1]) is Phase.SUCCEEDED

        await eventually(all_read, timeout=60)
    since = [heartbeat(f"w{n}") for n in range(50)] + ended_job(f"new-{uuid.uuid4().hex[:6]}")
    await publish_events(settings.broker_url, since)
    async with Gateway(settings) as second:
        again = second.jobs
        assert again is not None
        # Caught up at start: the log since its view's offset, and nothing before it.
        assert (again.read, again.skipped) == (2, 0)  # heartbeats: in their own log
        assert all(again.existing(job_id) is Phase.SUCCEEDED for job_id in before)


async def test_the_job_index_reads_on_after_its_channel_is_reopened(
    gateway: Gateway, settings: Settings
) -> None:
    """A channel error closes the index's stream channel under its robust channel, which
    reopens it: the index still acks what it reads there, so the broker goes on delivering
    past the prefetch (before, every ack raised on the old channel's last message, and
    the index stalled for good after PREFETCH messages: a gateway then answered nobody)."""
    index = gateway.jobs
    assert index is not None

    def accepted(n: int) -> Event:
        return Event(job_id=f"ro-{n}-{uuid.uuid4().hex[:6]}", phase=Phase.ACCEPTED, host="gw",
                     driver="docker", submitted_by="guest")  # fmt: skip

    async def read(job_id: str) -> bool:
        return index.existing(job_id) is Phase.ACCEPTED

    before = [accepted(n) for n in range(3 * JOB_INDEX_PREFETCH // 10)]  # acked some
    await publish_events(settings.broker_url, before)
    await eventually(lambda: read(before[-1].job_id or ""), timeout=30)
    channel = index._channel  # a robust channel
    await (await channel.get_underlay_channel()).close()
    after = [accepted(n) for n in range(3 * JOB_INDEX_PREFETCH)]
    await publish_events(settings.broker_url, after)
    await eventually(lambda: read(after[-1].job_id or ""), timeout=60)
