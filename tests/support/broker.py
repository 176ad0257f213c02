"""Talking to the test's RabbitMQ as any AMQP client (or its operator) would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aiohttp

from sandfleet.common.amqp import broker_login
from sandfleet.common.broker_roles import Permissions
from sandfleet.common.topology import DEAD_QUEUE, SUBMISSIONS_EXCHANGE

MANAGEMENT_URL = "http://127.0.0.1:15672"


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl -q ARGS` (blocking: call it through asyncio.to_thread from a test)."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def vhost_of(broker_url: str) -> str:
    return urlsplit(broker_url).path.removeprefix("/")


async def raw_submit(url: str, body: bytes) -> dict[str, object]:
    """Submit as any AMQP client would: publish to sandfleet.submissions with its login as
    the user_id, read the reply."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        submissions = await channel.get_exchange(SUBMISSIONS_EXCHANGE)
        await submissions.publish(
            aio_pika.Message(
                body, reply_to=replies.name, correlation_id="c1", user_id=broker_login(url)
            ),
            routing_key="",
        )
        async with asyncio.timeout(15), replies.iterator() as messages:
            async for message in messages:
                await message.ack()
                assert message.correlation_id == "c1"
                reply: dict[str, object] = json.loads(message.body)
                return reply
    raise AssertionError("no reply")


async def dead_letters(url: str) -> list[bytes]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DEAD_QUEUE)
        bodies = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            bodies.append(message.body)
        return bodies


async def ready_messages(url: str, queue_name: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


@contextmanager
def vhost_user(broker_url: str, permissions: Permissions) -> Iterator[str]:
    """The URL of a new user of the test's vhost with these permissions (and topic
    permissions on sandfleet.events and sandfleet.logs); the user is deleted afterwards."""
    user, password = f"sandfleet-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    vhost = vhost_of(broker_url)
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl(
            "set_permissions", "-p", vhost, user,
            permissions.configure, permissions.write, permissions.read,
        )  # fmt: skip
        for exchange, (write, read) in permissions.topic_permissions().items():
            rabbitmqctl("set_topic_permissions", "-p", vhost, user, exchange, write, read)
        yield broker_url.replace("guest:guest@", f"{user}:{password}@")
    finally:
        rabbitmqctl("delete_user", user)


async def managed_queue(broker_url: str, queue: str) -> dict[str, Any]:
    """The management API's view of a queue of the test's vhost. Its policy fields come
    with the broker's statistics, a few seconds behind: wait on them with `eventually`."""
    vhost, name = quote(vhost_of(broker_url), safe=""), quote(queue, safe="")
    headers = {"Authorization": aiohttp.encode_basic_auth("guest", "guest")}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{MANAGEMENT_URL}/api/queues/{vhost}/{name}") as response,
    ):
        response.raise_for_status()
        found: dict[str, Any] = await response.json()
        return found
