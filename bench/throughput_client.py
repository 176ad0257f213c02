"""The submitting side of the throughput bench: job requests, and a client that keeps a
window of submissions in flight and matches each reply to its request.

Whatever answers `sandfleet.submit` (a gateway, or the naive relay) is driven the same
way: a persistent submission on `sandfleet.submissions` carrying `reply_to` and a
correlation id, and the reply's `status` checked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Self, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bench.broker_tools import windowed
from bench.gateway_processes import check_alive
from sandfleet.common.amqp import broker_login
from sandfleet.common.topology import (
    SUBMISSIONS_EXCHANGE,
    SUBMIT_QUEUE,
    declare_topology,
    job_queue_name,
)

DRIVER = "docker"
T = TypeVar("T")


class BatchesUnsupported(Exception):
    """The gateway answered a `{"jobs": [...]}` submission without `results`."""


def request(i: int, host: str) -> dict[str, Any]:
    return {
        "job_id": f"bench-{i}-{uuid.uuid4().hex[:8]}",
        "placement": {"host": host},
        "resource_requirements": {"cpu": 1, "memory": "256Mi"},
        "template": {
            "image": "busybox",
            "command": ["sh", "-c", "echo hi"],
            "environment": {"RUN": str(i)},
            "timeout_seconds": 60,
            "driver_config": {"docker": {}, "vm": {"kernel": "/boot/vmlinuz"}},
        },
    }  # fmt: skip


def payloads(n: int, host: str) -> list[bytes]:
    return [json.dumps(request(i, host)).encode() for i in range(n)]


def batch_bodies(n: int, host: str, batch: int) -> list[bytes]:
    """`n` requests in submissions of `batch` each: `{"jobs": [request, ...]}`."""
    requests = [request(i, host) for i in range(n)]
    return [
        json.dumps({"jobs": requests[start : start + batch]}).encode()
        for start in range(0, n, batch)
    ]


def _accepted(reply: dict[str, Any]) -> None:
    if reply.get("status") != "accepted" or reply.get("duplicate"):
        raise RuntimeError(f"not taken as a new job: {json.dumps(reply)[:300]}")


class Submitter:
    """`async with Submitter(url, host) as s: await s.submit_all(bodies, window)`"""

    def __init__(self, url: str, host: str) -> None:
        self.url, self.host = url, host
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._reply_queue = ""

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect(self.url)
        self._channel = channel = await self._connection.channel(publisher_confirms=True)
        await declare_topology(self._connection, channel, job_queues=[(DRIVER, self.host)])
        replies = await channel.declare_queue(exclusive=True)
        self._reply_queue = replies.name
        await replies.consume(self._on_reply, no_ack=True)
        self._submissions = await channel.get_exchange(SUBMISSIONS_EXCHANGE)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def ask(self, body: bytes) -> dict[str, Any]:
        """Submit `body` (confirmed) and wait for its reply."""
        correlation_id = uuid.uuid4().hex
        future = self._pending[correlation_id] = asyncio.get_running_loop().create_future()
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id,
            reply_to=self._reply_queue,
            user_id=broker_login(self.url),
        )
        await self._submissions.publish(message, routing_key="")
        reply: dict[str, Any] = json.loads(await future)
        return reply

    async def submit_all(self, bodies: list[bytes], window: int) -> float:
        """Seconds to have every body submitted and answered `accepted`, `window` in flight."""

        async def one(i: int) -> None:
            _accepted(await self.ask(bodies[i]))

        started = time.perf_counter()
        await windowed(len(bodies), window, one)
        return time.perf_counter() - started

    async def submit_batches(self, bodies: list[bytes], window: int) -> float:
        """As submit_all, for `{"jobs": [...]}` bodies answered `{"results": [...]}`."""

        async def one(i: int) -> None:
            reply = await self.ask(bodies[i])
            if not isinstance(reply.get("results"), list):
                raise BatchesUnsupported(json.dumps(reply)[:300])
            sent = json.loads(bodies[i])["jobs"]
            if len(reply["results"]) != len(sent):
                raise RuntimeError(f"{len(sent)} jobs answered with {len(reply['results'])}")
            for result in reply["results"]:
                _accepted(result)

        started = time.perf_counter()
        await windowed(len(bodies), window, one)
        return time.perf_counter() - started

    async def consumers(self) -> int:
        """How many processes consume sandfleet.submit."""
        assert self._channel is not None
        queue = await self._channel.declare_queue(SUBMIT_QUEUE, passive=True)
        return int(queue.declaration_result.consumer_count or 0)

    async def queued(self) -> int:
        """How many jobs wait in this run's job queue."""
        assert self._channel is not None
        queue = await self._channel.declare_queue(job_queue_name(DRIVER, self.host), passive=True)
        return int(queue.declaration_result.message_count or 0)


async def answered(
    work: Awaitable[T], processes: list[subprocess.Popen[bytes]], timeout: float
) -> T:
    """`work`'s result; an error as soon as a gateway process dies, or past `timeout`."""
    task = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(timeout):
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done():
                    check_alive(processes)
        return task.result()
    finally:
        task.cancel()


async def raw_publishes(url: str, bodies: list[bytes], window: int) -> float:
    """Seconds for confirmed persistent publishes of `bodies` to a fresh quorum queue."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"bench.raw.{uuid.uuid4().hex[:6]}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        started = time.perf_counter()
        await windowed(
            len(bodies),
            window,
            lambda i: channel.default_exchange.publish(
                aio_pika.Message(bodies[i], delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            ),
        )
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
    return elapsed
