"""What the fleet's heartbeats cost a gateway: its CPU per heartbeat, and its admissions
with and without a heartbeat storm.

    python -m bench.gateway_heartbeats [--rate 1000] [--seconds 20] [-n 3000]

Starts `sandfleet gateway` in a throwaway vhost, then:
1. its CPU time (utime + stime, /proc/<pid>/stat) over `seconds` idle, and over
   `seconds` with `rate` heartbeats a second published into the event log (by a
   process of their own); the difference per heartbeat;
2. `n` submissions through it (as bench.gateway_throughput) without heartbeats, then
   with `rate` heartbeats a second flowing.
    python -m bench.gateway_heartbeats publish --url URL --rate R
publishes heartbeats at R a second until killed (the storm of step 1 and 2).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika

from bench.gateway_startup import heartbeat
from bench.gateway_throughput import payloads, through_gateway, throwaway_vhost
from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.common.topology import EVENTS_EXCHANGE, declare_topology

TICK = 0.01


async def publish(url: str, rate: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(connection, channel)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        beats = [heartbeat(f"w{n}") for n in range(50)]
        bodies = [(beat.model_dump_json().encode(), beat.routing_key) for beat in beats]
        sent, started = 0, time.monotonic()
        while True:
            due = int((time.monotonic() - started) * rate)
            for n in range(sent, due):
                body, key = bodies[n % len(bodies)]
                await exchange.publish(aio_pika.Message(body), routing_key=key)
            sent = due
            await asyncio.sleep(TICK)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def storm(url: str, rate: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "bench.gateway_heartbeats", "publish"]
    return subprocess.Popen([*command, "--url", url, "--rate", str(rate)])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


async def measure(url: str, gateway: int, rate: int, seconds: float, n: int) -> None:
    host = f"bench{uuid.uuid4().hex[:6]}"
    await through_gateway(url, payloads(50, host), 64, host)  # warm-up; waits for it
    before = cpu_seconds(gateway)
    await asyncio.sleep(seconds)  # a measuring window, not a wait on anything
    idle = cpu_seconds(gateway) - before
    publisher = storm(url, rate)
    try:
        await asyncio.sleep(2)  # the publisher's start-up, outside the window
        before = cpu_seconds(gateway)
        await asyncio.sleep(seconds)
        busy = cpu_seconds(gateway) - before
    finally:
        stop(publisher)
    per_beat = (busy - idle) / (rate * seconds)
    print(f"gateway CPU idle:            {idle / seconds * 100:6.1f} % of a core")
    print(f"with {rate} heartbeats/s:    {busy / seconds * 100:6.1f} % of a core")
    print(f"CPU per heartbeat:           {per_beat * 1e6:6.1f} µs")
    quiet, _ = await through_gateway(url, payloads(n, host), 256, host)
    publisher = storm(url, rate)
    try:
        await asyncio.sleep(2)
        stormy, _ = await through_gateway(url, payloads(n, host), 256, host)
    finally:
        stop(publisher)
    print(f"admissions without heartbeats: {n / quiet:7.0f} jobs/s")
    ratio = quiet / stormy
    print(f"admissions with {rate}/s:      {n / stormy:7.0f} jobs/s ({ratio:.2f} of those without)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", nargs="?", choices=["measure", "publish"], default="measure")
    parser.add_argument("--url")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args()
    if args.what == "publish":
        asyncio.run(publish(args.url, args.rate))
        return
    url, cleanup = throwaway_vhost(Settings().broker_url)
    keys = Path(tempfile.mkdtemp(prefix="sandfleet-bench-"))
    signing_key, _ = generate_keys(keys / "keys")
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": url,
        "SANDFLEET_HOST": "benchgw",
        "SANDFLEET_LOG_LEVEL": "WARNING",
        "SANDFLEET_SIGNING_KEY": str(signing_key),
        "SANDFLEET_VIEW_PATH": str(keys / "view" / "view.sqlite3"),
    }
    gateway = subprocess.Popen([sys.executable, "-m", "sandfleet", "gateway"], env=env)
    try:
        asyncio.run(measure(url, gateway.pid, args.rate, args.seconds, args.n))
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        cleanup()


if __name__ == "__main__":
    main()
