"""A gateway SIGKILLed at random points while it admits a stream of submissions (one
request each, many in flight) or batches: after a new gateway takes over, nothing
accepted is lost. Every job the replies call accepted, and every job with an `accepted`
event, is in the job queue; no job is there that was not accepted.

A job may be there twice: a gateway killed after its job's confirm but before the
submission's ack leaves a submission the broker delivers again, and the next gateway
cannot tell whether the job went out, so it queues it again (the host journal drops
the second copy on one host, not on another). The copies are bounded by what was in
hand at each kill; the test prints how many there were.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.models import SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.support.cli import sandfleet_env, spawn_sandfleet
from tests.support.job_queues import job_queue, queued_jobs

pytestmark = pytest.mark.integration

KILLS = 3


def request(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "template": {"image": "busybox", "command": ["true"]}}


@asynccontextmanager
async def gateways_killed_at_random(
    settings: Settings, client: Client, total: int, seed: int
) -> AsyncIterator[list[int]]:
    """A gateway process serving; while the body submits, SIGKILLed KILLS times, each
    after a random number of `accepted` events, and started again each time. Yields
    the list of the kill points (filled in as they happen)."""
    chooser = random.Random(seed)
    points = sorted(chooser.sample(range(1, total // 2), KILLS))
    env = sandfleet_env(settings, SANDFLEET_LOG_LEVEL="WARNING")
    killed: list[int] = []
    process = await spawn_sandfleet(env, "gateway")

    async def kill_at_points() -> None:
        nonlocal process
        seen = 0
        async with client.events(phases={Phase.ACCEPTED}) as accepted:
            async for _ in accepted:
                seen += 1
                if killed == points or seen < points[len(killed)]:
                    continue
                process.kill()
                await process.wait()
                killed.append(seen)
                process = await spawn_sandfleet(env, "gateway")
                if killed == points:
                    return

    killer = asyncio.create_task(kill_at_points())
    try:
        yield killed
    finally:
        killer.cancel()
        await asyncio.gather(killer, return_exceptions=True)
        process.kill()
        await process.wait()


async def check_nothing_accepted_is_lost(
    settings: Settings,
    client: Client,
    queue: str,
    submit: Callable[[list[dict[str, Any]]], Awaitable[list[SubmitReply]]],
    total: int,
    in_hand: int,
) -> None:
    """`in_hand`: how many requests a gateway holds at most (its prefetch of messages,
    times their requests): a kill can leave that many jobs queued but not acked."""
    seed = random.randrange(1 << 30)
    requests = [request(f"k-{uuid.uuid4().hex[:10]}") for _ in range(total)]
    async with gateways_killed_at_random(settings, client, total, seed) as killed:
        replies = await submit(requests)
    assert len(killed) == KILLS, f"seed {seed}: killed at {killed} only"
    assert all(reply.accepted for reply in replies), f"seed {seed}"
    replied = {reply.job_id for reply in replies}
    assert replied == {r["job_id"] for r in requests}
    copies = await queued_jobs(settings.broker_url, queue)
    logged = {e.job_id for e in await accepted_events(client)}
    assert set(copies) == replied == logged, f"seed {seed}: lost {replied - set(copies)}"
    extra = sum(count - 1 for count in copies.values())
    print(f"seed {seed}: killed after {killed} accepted events; {extra} jobs queued twice")
    assert extra <= KILLS * in_hand, f"seed {seed}: {extra} copies"


async def accepted_events(client: Client) -> list[Any]:
    async with client.events(phases={Phase.ACCEPTED}, from_start=True) as stream:
        return [event async for event in stream.history()]


async def test_a_gateway_killed_amid_single_submissions_loses_nothing(
    settings: Settings, client_without_gateway: Client
) -> None:
    client = client_without_gateway
    queue = await job_queue(settings.broker_url)

    async def one_by_one(requests: list[dict[str, Any]]) -> list[SubmitReply]:
        return list(await asyncio.gather(*(client.submit(r, timeout=180) for r in requests)))

    in_hand = settings.gateway_concurrency
    await check_nothing_accepted_is_lost(settings, client, queue, one_by_one, 600, in_hand)


async def test_a_gateway_killed_amid_batches_loses_nothing(
    settings: Settings, client_without_gateway: Client
) -> None:
    client = client_without_gateway
    queue = await job_queue(settings.broker_url)

    async def in_batches(requests: list[dict[str, Any]]) -> list[SubmitReply]:
        return await client.submit_many(requests, batch_size=100, in_flight=4, timeout=180)

    await check_nothing_accepted_is_lost(settings, client, queue, in_batches, 2000, 4 * 100)


@pytest.fixture
async def client_without_gateway(settings: Settings) -> AsyncIterator[Client]:
    await job_queue(settings.broker_url)  # the exchanges a client looks for
    async with Client(settings=settings) as client:
        yield client
