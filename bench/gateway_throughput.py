"""Gateway throughput against raw aio-pika on the same broker, in the same run.

    python -m bench.gateway_throughput [-n 5000] [--window 256]

baseline: N confirmed, persistent publishes of the job payloads straight into a
          plain quorum queue (what a client could do with no gateway at all).
gateway:  N submissions to sandfleet.submit, each validated by a real gateway process
          (`sandfleet gateway`), routed to a bound quorum job queue with confirms and
          mandatory routing, plus its `accepted` event; timed until all N replies
          are back and all N jobs sit in the job queue.
Both use the broker named by SANDFLEET_BROKER_URL, in a throwaway vhost when the
local rabbitmqctl can make one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from sandfleet.common.amqp import broker_login
from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.common.topology import SUBMISSIONS_EXCHANGE, declare_topology, job_queue_name


def payloads(n: int, host: str) -> list[bytes]:
    return [
        json.dumps({
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
        }).encode()
        for i in range(n)
    ]  # fmt: skip


async def windowed(n: int, window: int, send: Callable[[int], Awaitable[object]]) -> None:
    """Run send(0..n-1) with at most `window` in flight."""
    gate = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with gate:
            await send(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def baseline(url: str, bodies: list[bytes], window: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"bench.baseline.{uuid.uuid4().hex[:6]}",
            durable=True,
            arguments={"x-queue-type": "quorum"},
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


async def through_gateway(
    url: str, bodies: list[bytes], window: int, host: str
) -> tuple[float, int]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(connection, channel, job_queues=[("docker", host)])
        replies = await channel.declare_queue(exclusive=True)
        pending: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            pending.pop(message.correlation_id or "").set_result(message.body)

        await replies.consume(on_reply, no_ack=True)

        submissions = await channel.get_exchange(SUBMISSIONS_EXCHANGE)

        async def submit(i: int) -> None:
            future = asyncio.get_running_loop().create_future()
            pending[str(i)] = future
            await submissions.publish(
                aio_pika.Message(
                    bodies[i],
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    correlation_id=str(i),
                    reply_to=replies.name,
                    user_id=broker_login(url),
                ),
                routing_key="",
            )
            reply = json.loads(await future)
            if reply["status"] != "accepted" or reply.get("duplicate"):
                raise RuntimeError(f"gateway did not take a benchmark job as new: {reply}")

        started = time.perf_counter()
        await windowed(len(bodies), window, submit)
        elapsed = time.perf_counter() - started
        queued = await _depth(channel, job_queue_name("docker", host))
        await (await channel.get_queue(job_queue_name("docker", host))).delete(
            if_unused=False, if_empty=False
        )
    return elapsed, queued


async def _depth(channel: AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


def throwaway_vhost(base_url: str) -> tuple[str, Callable[[], None]]:
    vhost = f"sandfleet-bench-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return base_url, lambda: None
    url = base_url.rstrip("/") + "/" + vhost

    def cleanup() -> None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)

    return url, cleanup


async def measure(url: str, n: int, window: int) -> None:
    host = f"bench{uuid.uuid4().hex[:6]}"
    bodies = payloads(n, host)
    # Warm-up (waits for the gateway), with job ids of its own: the gateway answers a
    # job id it has seen as a duplicate and queues nothing.
    await through_gateway(url, payloads(50, host), window, host)
    raw = await baseline(url, bodies, window)
    gw, queued = await through_gateway(url, bodies, window, host)

    raw_rate, gw_rate = n / raw, n / gw
    print(f"submissions:             {n} (window {window})")
    print(f"raw aio-pika (baseline): {raw_rate:9.0f} msg/s  ({raw:.2f} s)")
    print(f"through the gateway:     {gw_rate:9.0f} jobs/s ({gw:.2f} s, {queued} jobs queued)")
    print(f"gateway / baseline:      {gw_rate / raw_rate:9.2f}")
    if queued != n:
        raise SystemExit(f"expected {n} jobs in the job queue, found {queued}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5000, help="submissions (default 5000)")
    parser.add_argument("--window", type=int, default=256, help="publishes in flight (default 256)")
    args = parser.parse_args()

    url, cleanup = throwaway_vhost(Settings().broker_url)
    # The gateway signs every job, as in a real fleet (Ed25519: tens of microseconds).
    signing_key, _ = generate_keys(Path(tempfile.mkdtemp(prefix="sandfleet-bench-")) / "keys")
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": url,
        "SANDFLEET_HOST": "benchgw",
        "SANDFLEET_LOG_LEVEL": "WARNING",
        "SANDFLEET_SIGNING_KEY": str(signing_key),
    }
    gateway = subprocess.Popen([sys.executable, "-m", "sandfleet", "gateway"], env=env)
    try:
        asyncio.run(measure(url, args.n, args.window))
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        cleanup()


if __name__ == "__main__":
    main()
