"""A job longer than the broker's consumer timeout runs to completion, once.

RabbitMQ closes the channel of a consumer that holds a delivery unacked longer than
`consumer_timeout` (checked on a one-minute tick). The worker acks a job once it is
journaled, so it never holds one that long; a raw consumer in the same broker that
does hold one is the control that proves the short timeout is in force.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.support import until_terminal
from tests.support.runtimes import WorkerFactory, sandboxes_created

pytestmark = pytest.mark.integration

SHORT_TIMEOUT_MS = 2000
DEFAULT_TIMEOUT_MS = 1_800_000  # RabbitMQ 3.10's default


def set_consumer_timeout(ms: int) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "eval", f"application:set_env(rabbit, consumer_timeout, {ms})."],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def short_consumer_timeout() -> Iterator[None]:
    set_consumer_timeout(SHORT_TIMEOUT_MS)
    try:
        yield
    finally:
        set_consumer_timeout(DEFAULT_TIMEOUT_MS)


def _settle(future: asyncio.Future[float], value: float) -> None:
    if not future.done():
        future.set_result(value)


async def a_hoarding_consumer_is_cut_off(url: str) -> float:
    """Seconds until the broker closes a channel that holds a delivery unacked."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        closed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        channel.close_callbacks.add(lambda *_: _settle(closed, time.monotonic()))
        received: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def hold(_: AbstractIncomingMessage) -> None:  # and never ack
            _settle(received, time.monotonic())

        await queue.consume(hold)
        await channel.default_exchange.publish(aio_pika.Message(b"hold"), routing_key=queue.name)
        start = await received
        async with asyncio.timeout(120):
            return await closed - start


async def test_job_longer_than_the_consumer_timeout_runs_once(
    short_consumer_timeout: None,
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
) -> None:
    job_id = f"long-{uuid.uuid4().hex[:8]}"
    since = time.time()
    request = {
        "job_id": job_id,
        "template": {"image": test_image, "command": ["sh", "-c", "sleep 75; echo finished"]},
    }
    async with docker_worker(), client.events(job_id=job_id) as stream:
        control = asyncio.create_task(a_hoarding_consumer_is_cut_off(settings.broker_url))
        assert (await client.submit(request)).accepted
        events = await until_terminal(stream, job_id, timeout=150)
        cut_off_after = await control
    assert cut_off_after < 75  # the short timeout really was in force during the job
    assert [e.phase for e in events] == [
        Phase.ACCEPTED, Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED
    ]  # fmt: skip
    assert events[-1].output == "finished\n"
    assert sandboxes_created("docker", since)[job_id] == 1
