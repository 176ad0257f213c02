"""Gateway start-up against a long event log: time to consuming submissions, and RSS.

    python -m bench.gateway_startup fill --url URL [-n 1000000]
    python -m bench.gateway_startup start --url URL --view PATH [--runs 2]

fill:  writes `n` events into the event log of the vhost at URL, pipelined with
       confirms: jobs of many ids (accepted, running, succeeded: three events each)
       and, between them, worker heartbeats (one in four messages).
start: starts `sandfleet gateway` on that vhost with its job view at PATH, `runs` times
       in a row (the first with an empty view catches up with the whole log; the next
       resume from the view's offset), and prints for each run the seconds from the
       process's start to its "consuming" log line and its RSS then.
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

from sandfleet.common.amqp import json_message
from sandfleet.common.events import Event, Phase, WorkerHealth
from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.common.topology import EVENTS_EXCHANGE, declare_topology

WINDOW = 2000


def heartbeat(host: str) -> Event:
    health = WorkerHealth(
        slots=8, free_slots=3, jobs_started=100, jobs_finished=97,
        started_at=Event(job_id=None, phase=Phase.HEARTBEAT, host=host).timestamp,
        heartbeat_seconds=10.0,
        gpus=[{"index": str(i), "uuid": f"GPU-{i:04d}", "memory_mib": 81920} for i in range(8)],
        gpus_free=3, gpu_source="nvml",
        warm_pools=[{"pool": "p", "image": "busybox", "ready": 2, "target": 2, "error": ""}],
    )  # fmt: skip
    return Event(
        job_id=None, phase=Phase.HEARTBEAT, reason="Alive", driver="docker", host=host,
        worker_id=f"{host}-1", health=health,
    )  # fmt: skip


def job_events(n: int) -> list[Event]:
    job_id = f"fill-{n}-{uuid.uuid4().hex[:8]}"
    common = {"job_id": job_id, "driver": "docker"}
    worker = {"host": f"w{n % 50}", "worker_id": f"w{n % 50}-1"}
    return [
        Event(phase=Phase.ACCEPTED, host="gw", submitted_by="guest", labels={"n": str(n)},
              message="queued on sandfleet.jobs.docker", **common),
        Event(phase=Phase.RUNNING, gpus=["0"], **worker, **common),
        Event(phase=Phase.SUCCEEDED, exit_code=0, output="hi\n",
              timings={"queued": 0.1, "creating": 0.5, "running": 1.0}, **worker, **common),
    ]  # fmt: skip


def events(n: int) -> list[Event]:
    out: list[Event] = []
    job = 0
    while len(out) < n:
        out.append(heartbeat(f"w{job % 50}"))
        out.extend(job_events(job))
        job += 1
    return out[:n]


async def fill(url: str, n: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(connection, channel)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        gate = asyncio.Semaphore(WINDOW)
        started, sent = time.perf_counter(), 0

        async def one(event: Event) -> None:
            async with gate:
                message = json_message(event, message_id=event.event_id, type="sandfleet.event")
                await exchange.publish(message, routing_key=event.routing_key)

        for start in range(0, n, 50_000):
            batch = events(min(50_000, n - start))
            await asyncio.gather(*(one(event) for event in batch))
            sent += len(batch)
            rate = sent / (time.perf_counter() - started)
            print(f"{sent} events in the log ({rate:.0f}/s)", flush=True)


def start_once(url: str, view: Path, signing_key: Path) -> tuple[float, int]:
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": url,
        "SANDFLEET_HOST": "benchgw",
        "SANDFLEET_LOG_LEVEL": "INFO",
        "SANDFLEET_SIGNING_KEY": str(signing_key),
        "SANDFLEET_VIEW_PATH": str(view),
    }
    started = time.perf_counter()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "sandfleet", "gateway"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert gateway.stderr is not None
        for line in gateway.stderr:
            if "consuming sandfleet.submit" in line:
                break
        else:
            raise SystemExit("the gateway ended before consuming")
        elapsed = time.perf_counter() - started
        status = Path(f"/proc/{gateway.pid}/status").read_text()
        rss_kib = int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
    return elapsed, rss_kib


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", choices=["fill", "start"])
    parser.add_argument("--url", default=Settings().broker_url)
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument("--view", type=Path)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if args.what == "fill":
        asyncio.run(fill(args.url, args.n))
        return
    view = args.view or Path(tempfile.mkdtemp(prefix="sandfleet-bench-")) / "view.sqlite3"
    signing_key, _ = generate_keys(Path(tempfile.mkdtemp(prefix="sandfleet-bench-")) / "keys")
    for run in range(args.runs):
        elapsed, rss_kib = start_once(args.url, view, signing_key)
        print(f"run {run + 1}: consuming after {elapsed:.2f} s, RSS {rss_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
