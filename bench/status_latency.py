"""`status` and `jobs` latency with a small and a large history, in the same run, and the
gateway's start-up time and memory with that history.

    python -m bench.status_latency [--small 10] [--large 100000] [--queries 200]

For each size N, in a throwaway vhost (when the local rabbitmqctl can make one): N jobs'
events (`accepted`, then `succeeded` with timings) are written straight into the event
log, as the broker's admin may; then a real gateway process (`sandfleet gateway`) starts
twice on the same view file:
  cold:  an empty view, built from the whole log (what a new gateway does once);
  warm:  the view it left, resumed at its offset (what every restart does).
Start-up is the time from spawning the gateway to its first answer; RSS is the gateway's
resident memory then. Latency is the client's round trip for `status` of a random job
and for `jobs --limit 50`, `--queries` times each, on the warm gateway.
The requirement checked: status with the large history answers (p50) within 2x of
with the small one. The two gateways run side by side and the queries alternate
between them, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aio_pika

from bench.broker_tools import throwaway_vhost, windowed
from sandfleet.common.errors import FleetUnreachable
from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.common.topology import EVENTS_EXCHANGE, declare_topology
from sandfleet.common.view_queries import ViewQuery
from sandfleet.gateway.client import Client

PUBLISH_WINDOW = 512
START_TIMEOUT_SECONDS = 600.0
ASK_SECONDS = 5.0


@dataclass
class Start:
    seconds: float
    rss_mib: float


@dataclass
class Result:
    jobs: int
    cold: Start
    warm: Start
    status_ms: list[float]
    jobs_ms: list[float]


def job_events(index: int) -> list[Event]:
    job_id, now = f"bench-{index}", datetime.now(UTC)
    timings = {"queued": 0.1 + index % 7, "creating": 0.5, "starting": 0.2, "running": 2.0}
    return [
        Event(job_id=job_id, phase=Phase.ACCEPTED, driver="docker", host="benchgw",
              submitted_by="guest", labels={"batch": str(index % 10)}, timestamp=now),
        Event(job_id=job_id, phase=Phase.SUCCEEDED, driver="docker", host=f"w{index % 4}",
              worker_id=f"w{index % 4}-1", exit_code=0, timings=timings, timestamp=now),
    ]  # fmt: skip


async def write_history(url: str, jobs: int) -> None:
    """`jobs` jobs' events into the log, confirmed, `PUBLISH_WINDOW` in flight."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(connection, channel)
        events = await channel.get_exchange(EVENTS_EXCHANGE)

        async def publish(index: int) -> None:
            for event in job_events(index):
                message = aio_pika.Message(event.model_dump_json().encode())
                await events.publish(message, routing_key=event.routing_key)

        await windowed(jobs, PUBLISH_WINDOW, publish)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def start_gateway(env: dict[str, str], url: str) -> tuple[Process, Start]:
    """A gateway process, timed from its spawning to its first answer."""
    started = time.perf_counter()
    gateway = await asyncio.create_subprocess_exec(sys.executable, "-m", "sandfleet", "gateway",
                                                   env=env)  # fmt: skip
    async with Client(url) as client, asyncio.timeout(START_TIMEOUT_SECONDS):
        while True:
            # A question waits in sandfleet.view until the gateway, caught up, takes it,
            # or expires there (30 s): asked again until answered.
            try:
                await client.query(ViewQuery(kind="jobs", limit=1), timeout=ASK_SECONDS)
                break
            except FleetUnreachable:
                continue
    return gateway, Start(time.perf_counter() - started, rss_mib(gateway.pid))


async def stop(gateway: Process) -> None:
    gateway.terminate()
    await asyncio.wait_for(gateway.wait(), timeout=60)


@dataclass
class Fleet:
    """A throwaway vhost with `jobs` jobs in its log, and its gateway's settings."""

    jobs: int
    url: str
    env: dict[str, str]


def fleet(base_url: str, jobs: int, signing_key: Path) -> tuple[Fleet, Callable[[], None]]:
    url, cleanup = throwaway_vhost(base_url)
    view_dir = Path(tempfile.mkdtemp(prefix="sandfleet-bench-view-"))
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": url,
        "SANDFLEET_HOST": "benchgw",
        "SANDFLEET_LOG_LEVEL": "WARNING",
        "SANDFLEET_SIGNING_KEY": str(signing_key),
        "SANDFLEET_VIEW_PATH": str(view_dir / "view.sqlite3"),
    }
    return Fleet(jobs, url, env), cleanup


async def timed_ms(ask: Awaitable[object]) -> float:
    started = time.perf_counter()
    await ask
    return (time.perf_counter() - started) * 1000


async def latencies(fleets: list[Fleet], queries: int) -> list[tuple[list[float], list[float]]]:
    """(status ms, jobs ms) per fleet, the queries alternating between the fleets."""
    timings: list[tuple[list[float], list[float]]] = [([], []) for _ in fleets]
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(f.url)) for f in fleets]
        for _ in range(queries):
            for client, fleet_, (status_ms, jobs_ms) in zip(clients, fleets, timings, strict=True):
                job_id = f"bench-{random.randrange(fleet_.jobs)}"
                status_ms.append(await timed_ms(client.status(job_id)))
                jobs_ms.append(await timed_ms(client.query(ViewQuery(kind="jobs", limit=50))))
    return timings


async def measure(base_url: str, sizes: list[int], queries: int, signing_key: Path) -> list[Result]:
    async with AsyncExitStack() as stack:
        fleets = []
        for jobs in sizes:
            made, cleanup = fleet(base_url, jobs, signing_key)
            stack.callback(cleanup)
            await write_history(made.url, jobs)
            fleets.append(made)
        starts: list[tuple[Start, Start]] = []
        for made in fleets:
            gateway, cold = await start_gateway(made.env, made.url)
            await stop(gateway)
            gateway, warm = await start_gateway(made.env, made.url)
            stack.push_async_callback(stop, gateway)
            starts.append((cold, warm))
        timings = await latencies(fleets, queries)
    return [
        Result(made.jobs, cold, warm, status_ms, jobs_ms)
        for made, (cold, warm), (status_ms, jobs_ms) in zip(fleets, starts, timings, strict=True)
    ]


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def report(results: list[Result]) -> None:
    print(f"{'jobs':>8} {'cold start':>11} {'warm start':>11} {'RSS cold':>9} {'RSS warm':>9}"
          f" {'status p50':>11} {'p95':>7} {'jobs p50':>9} {'p95':>7}")  # fmt: skip
    for r in results:
        print(
            f"{r.jobs:>8} {r.cold.seconds:>10.2f}s {r.warm.seconds:>10.2f}s"
            f" {r.cold.rss_mib:>7.0f}Mi {r.warm.rss_mib:>7.0f}Mi"
            f" {quantile(r.status_ms, 50):>9.2f}ms {quantile(r.status_ms, 95):>5.2f}ms"
            f" {quantile(r.jobs_ms, 50):>7.2f}ms {quantile(r.jobs_ms, 95):>5.2f}ms"
        )
    small, large = results[0], results[-1]
    ratio = quantile(large.status_ms, 50) / quantile(small.status_ms, 50)
    verdict = "meets" if ratio <= 2 else "FAILS"
    print(f"status p50, {large.jobs} jobs / {small.jobs} jobs: {ratio:.2f} ({verdict} ≤ 2)")
    if ratio > 2:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--small", type=int, default=10, help="jobs (default 10)")
    parser.add_argument("--large", type=int, default=100_000, help="jobs (default 100000)")
    parser.add_argument("--queries", type=int, default=200, help="of each (default 200)")
    args = parser.parse_args()
    signing_key, _ = generate_keys(Path(tempfile.mkdtemp(prefix="sandfleet-bench-")) / "keys")
    base_url = Settings().broker_url
    report(asyncio.run(measure(base_url, [args.small, args.large], args.queries, signing_key)))


if __name__ == "__main__":
    main()
