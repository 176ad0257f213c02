"""The naive relay: the gateway's broker work and nothing else, one message at a time.

    python -m bench.naive_relay URL

Consumes `sandfleet.submit` and, for each submission in turn: publishes an `accepted`
event (confirmed) to the events exchange, then the request as the job (confirmed,
mandatory) to the job exchange, then the reply (on the same confirming channel, so
confirmed too, as the gateway's is), then acks. No validation, no signing,
no idempotency: what any relay must at least do, done the obvious way. The bench's
client drives it exactly as it drives a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from sandfleet.common.events import Event, Phase
from sandfleet.common.topology import SUBMIT_QUEUE, Topology, declare_topology, job_routing_key

PREFETCH = 64  # the gateway's default SANDFLEET_GATEWAY_CONCURRENCY


async def relay(url: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = await declare_topology(connection, channel)
        await channel.set_qos(prefetch_count=PREFETCH)
        submit = await channel.get_queue(SUBMIT_QUEUE)
        async with submit.iterator() as submissions:
            async for message in submissions:
                await relay_one(channel, topology, message)
                await message.ack()


async def relay_one(
    channel: AbstractChannel, topology: Topology, message: AbstractIncomingMessage
) -> None:
    """Event (confirmed), then job (confirmed, mandatory), then reply."""
    request = json.loads(message.body)
    event = Event(
        job_id=request["job_id"],
        phase=Phase.ACCEPTED,
        reason="Accepted",
        driver="docker",
        host="relay",
        submitted_by=message.user_id,
    )
    await topology.events.publish(
        aio_pika.Message(
            event.model_dump_json().encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        ),
        routing_key=event.routing_key,
    )
    await topology.jobs.publish(
        aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=job_routing_key("docker", request["placement"]["host"]),
        mandatory=True,
    )
    reply = json.dumps({"status": "accepted", "job_id": request["job_id"]}).encode()
    await channel.default_exchange.publish(
        aio_pika.Message(reply, correlation_id=message.correlation_id),
        routing_key=message.reply_to or "",
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # stopped by the bench
        asyncio.run(relay(sys.argv[1]))
