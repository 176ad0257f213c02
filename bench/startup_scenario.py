"""Start-up with a big event log: how long a gateway takes from launch to answering a
submission, with an empty log, the first time on a full one (it reads the whole log,
and its job view fills), and restarted with its view kept.

Each time is from spawning `sandfleet gateway` (interpreter start and imports
included) to the reply to one submission sent at once (it waits in sandfleet.submit
meanwhile). A gateway is stopped with SIGTERM and waited for, its view flushed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from bench.broker_tools import vhost
from bench.event_log_fill import fill
from bench.gateway_processes import rss_mib, start_gateway, stop
from bench.throughput_client import Submitter, answered, payloads
from bench.throughput_scenarios import BenchRun
from tests.support.throughput_goals import Startup

STARTUP_TIMEOUT = 1800.0


async def first_reply(
    run: BenchRun, url: str, submitter: Submitter, view: Path
) -> tuple[float, float]:
    """(seconds from launch to the first reply, the gateway's RSS in MiB then)."""
    body = payloads(1, submitter.host)[0]
    started = time.perf_counter()
    process = start_gateway(run.kit, url, view, "benchgwstart")
    try:
        reply = await answered(submitter.ask(body), [process], STARTUP_TIMEOUT)
        seconds = time.perf_counter() - started
        rss = rss_mib(process.pid)
    finally:
        await asyncio.to_thread(stop, process)
    if reply.get("status") != "accepted":
        raise RuntimeError(f"the start-up submission was not accepted: {reply}")
    return seconds, rss


def say(line: str) -> None:
    print(f"  startup: {line}", file=sys.stderr, flush=True)


async def startup(run: BenchRun, events: int) -> Startup:
    host = f"bench{uuid.uuid4().hex[:6]}"
    async with vhost(run.base_url) as url, Submitter(url, host) as submitter:
        empty, _ = await first_reply(run, url, submitter, run.kit.view_path())
        say(f"empty log: {empty:.2f} s to the first reply")
        fill_rate = await fill(url, events, run.window)
        say(f"{events:,} events in the log, at {fill_rate:,.0f}/s")
        view = run.kit.view_path()
        cold, cold_rss = await first_reply(run, url, submitter, view)
        say(f"first start: {cold:.2f} s to the first reply, {cold_rss:,.0f} MiB")
        restart, restart_rss = await first_reply(run, url, submitter, view)
        say(f"restart: {restart:.2f} s to the first reply, {restart_rss:,.0f} MiB")
    return Startup(
        events=events,
        fill_rate=fill_rate,
        empty_seconds=empty,
        cold_seconds=cold,
        restart_seconds=restart,
        cold_rss_mib=cold_rss,
        restart_rss_mib=restart_rss,
    )
