"""How fast a worker ships a job's output, and what a flood of output costs its other jobs.

    python -m bench.log_throughput [-n 200000] [--image sandfleet-test/busybox:latest]

In one run, against a real gateway and docker worker (2 slots) in this process, on the
broker named by SANDFLEET_BROKER_URL (a throwaway vhost when rabbitmqctl can make one):

  idle           a second job (`true`) alone: submit → running latency
  no follower    a job printing N lines (`seq 1 N`); shipped lines/s, from its
                 `running` event to its terminal one (the log ends before that); a
                 second job's start latency submitted while it ships
  follower       the same with `Client.logs(follow=True)` reading it meanwhile
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bench.broker_tools import throwaway_vhost
from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.gateway.client import Client
from sandfleet.gateway.service import Gateway
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost
from sandfleet.workers.runtime import Worker


def request(image: str, script: str) -> dict[str, Any]:
    return {
        "job_id": f"bench-{uuid.uuid4().hex[:10]}",
        "template": {"image": image, "command": ["sh", "-c", script]},
    }


@asynccontextmanager
async def fleet(url: str) -> AsyncIterator[Client]:
    keys = Path(tempfile.mkdtemp(prefix="sandfleet-bench-"))
    signing_key, public_key = generate_keys(keys / "keys")
    settings = Settings(
        broker_url=url,
        host=f"bench{uuid.uuid4().hex[:6]}",
        signing_key=signing_key,
        trusted_keys=str(public_key),
        state_dir=keys / "state",
        journal_dir=keys / "journal",
    )
    plugin = registry.load("docker")
    driver = plugin.make(plugin.settings(), DriverHost(cdi_kind=settings.cdi_kind))
    try:
        async with Gateway(settings), Worker(settings, driver, slots=2), Client(url) as client:
            yield client
    finally:
        await driver.aclose()


async def next_event(events: AsyncIterator[Event], terminal: bool) -> Event:
    """The next running event (or, with `terminal`, the next terminal one)."""
    async for event in events:
        if event.phase.is_terminal if terminal else event.phase is Phase.RUNNING:
            return event
    raise AssertionError("a live stream does not end")


async def start_latency(client: Client, image: str) -> float:
    """Seconds from submitting a `true` job to its `running` event."""
    job = request(image, "true")
    started = time.perf_counter()
    async with client.events(job_id=job["job_id"], phases={Phase.RUNNING}) as stream:
        assert (await client.submit(job)).accepted
        async for _ in stream:
            return time.perf_counter() - started
    raise AssertionError("a live stream does not end")


async def flood(client: Client, image: str, lines: int, *, follow: bool) -> tuple[float, float]:
    """(lines/s shipped, a second job's start latency meanwhile) for `seq 1 lines`."""
    job = request(image, f"seq 1 {lines}")
    async with client.events(job_id=job["job_id"]) as stream:
        assert (await client.submit(job)).accepted
        events = aiter(stream)
        running = await next_event(events, terminal=False)
        follower = client.logs(job["job_id"], follow=True)
        reading = asyncio.create_task(count(follower)) if follow else None
        latency = await start_latency(client, image)
        ended = await next_event(events, terminal=True)
    shipped = await (reading or count(client.logs(job["job_id"])))
    if shipped != lines:
        raise RuntimeError(f"{shipped} of {lines} lines read back")
    return lines / (ended.timestamp - running.timestamp).total_seconds(), latency


async def count(lines: AsyncIterator[str]) -> int:
    return sum([1 async for _ in lines])


async def measure(url: str, lines: int, image: str) -> None:
    async with fleet(url) as client:
        await start_latency(client, image)  # warm: the image and the first container
        idle = await start_latency(client, image)
        unfollowed, during = await flood(client, image, lines, follow=False)
        followed, during_followed = await flood(client, image, lines, follow=True)
    print(f"{lines:,} lines (`seq 1 {lines}`), docker worker with 2 slots")
    print(f"{'':24} {'lines/s shipped':>16} {'2nd job start (s)':>18}")
    print(f"{'idle':24} {'—':>16} {idle:>18.2f}")
    print(f"{'flood, no follower':24} {unfollowed:>16,.0f} {during:>18.2f}")
    print(f"{'flood, one follower':24} {followed:>16,.0f} {during_followed:>18.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="lines the flooding job prints")
    parser.add_argument("--image", default="sandfleet-test/busybox:latest")
    args = parser.parse_args()
    url, cleanup = throwaway_vhost(Settings().broker_url)
    try:
        asyncio.run(measure(url, args.n, args.image))
    finally:
        cleanup()


if __name__ == "__main__":
    main()
