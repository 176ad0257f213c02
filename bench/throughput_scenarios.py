"""The throughput bench's scenarios: each in a throwaway vhost of its own on the same
broker, each returning its rate (tests/support/throughput_goals.Figure)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bench.broker_tools import vhost
from bench.celery_baseline import celery_rate
from bench.gateway_processes import GatewayKit, start_gateway, stop
from bench.process_cpu import CpuMeter, broker_pids
from bench.throughput_client import (
    BatchesUnsupported,
    Submitter,
    answered,
    batch_bodies,
    payloads,
    raw_publishes,
)
from tests.support.throughput_goals import HEARTBEATS_PER_SECOND, Figure

WARM_UP = 50  # submissions answered before the clock starts: every process is consuming
READY_TIMEOUT = 120.0
RUN_TIMEOUT = 1800.0
Starter = Callable[[str, int], "subprocess.Popen[bytes]"]


@dataclass(frozen=True)
class BenchRun:
    base_url: str
    n: int
    window: int
    batch: int
    kit: GatewayKit

    def gateway(self, url: str, i: int) -> subprocess.Popen[bytes]:
        return start_gateway(self.kit, url, self.kit.view_path(), f"benchgw{i}")


def naive_relay(url: str, _: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.naive_relay", url])


@asynccontextmanager
async def served(
    run: BenchRun, start: Starter, count: int = 1
) -> AsyncIterator[tuple[str, Submitter, list[subprocess.Popen[bytes]]]]:
    """A vhost, a client on it, and `count` processes answering its submissions (warmed
    up: each has answered); on the way out, the job queue's depth is checked."""
    host = f"bench{uuid.uuid4().hex[:6]}"
    async with vhost(run.base_url) as url, Submitter(url, host) as submitter:
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes.extend(start(url, i) for i in range(count))
            await answered(_consuming(submitter, count), processes, READY_TIMEOUT)
            warm_up = payloads(WARM_UP * count, host)
            await answered(submitter.submit_all(warm_up, run.window), processes, READY_TIMEOUT)
            yield url, submitter, processes
        finally:
            for process in processes:
                await asyncio.to_thread(stop, process)


async def _consuming(submitter: Submitter, count: int) -> None:
    """Until `count` processes consume sandfleet.submit (each ready, not just the first;
    the broker tells a new consumer to nobody, so its count is polled)."""
    while await submitter.consumers() < count:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Timed:
    """A timed run: its seconds, and the CPU seconds its answering processes and the
    broker (where it runs on this machine) spent meanwhile."""

    seconds: float
    cpu: float | None  # None: no process of its own answered (raw, Celery)
    broker_cpu: float | None

    def figure(self, jobs: int, note: str) -> Figure:
        return Figure(
            jobs / self.seconds, note, _per_job(self.cpu, jobs), _per_job(self.broker_cpu, jobs)
        )


def _per_job(seconds: float | None, jobs: int) -> float | None:
    return None if seconds is None else seconds * 1000 / jobs


async def timed(work: Awaitable[float], processes: list[subprocess.Popen[bytes]]) -> Timed:
    """`work`'s seconds (bench.throughput_client.answered), metered."""
    brokers = broker_pids()
    answering, broker = CpuMeter.of(p.pid for p in processes), CpuMeter.of(brokers)
    answering.start()
    broker.start()
    seconds = await answered(work, processes, RUN_TIMEOUT)
    cpu = answering.seconds() if processes else None
    return Timed(seconds, cpu, broker.seconds() if brokers else None)


async def _timed_jobs(
    submitter: Submitter, processes: list[subprocess.Popen[bytes]], run: BenchRun, *, warmed: int
) -> Timed:
    """run.n single-job submissions, timed, the job queue checked after."""
    bodies = payloads(run.n, submitter.host)
    outcome = await timed(submitter.submit_all(bodies, run.window), processes)
    queued = await submitter.queued()
    if queued != warmed + run.n:
        raise RuntimeError(f"expected {warmed + run.n} jobs in the job queue, found {queued}")
    return outcome


async def raw(run: BenchRun) -> Figure:
    async with vhost(run.base_url) as url:
        outcome = await timed(raw_publishes(url, payloads(run.n, "raw"), run.window), [])
    return outcome.figure(run.n, f"window {run.window}")


async def relay(run: BenchRun) -> Figure:
    async with served(run, naive_relay) as (_, submitter, processes):
        outcome = await _timed_jobs(submitter, processes, run, warmed=WARM_UP)
    return outcome.figure(run.n, "its own process, prefetch 64")


async def celery(run: BenchRun) -> Figure:
    async with vhost(run.base_url) as url:
        rate = await asyncio.to_thread(celery_rate, url, payloads(run.n, "celery"))
    if rate is None:
        return Figure(missing="skipped (pip install .[bench])")
    return Figure(rate, "apply_async in a loop, one thread, each confirmed")


async def gateway(run: BenchRun, *, processes: int = 1) -> Figure:
    async with served(run, run.gateway, processes) as (_, submitter, started):
        outcome = await _timed_jobs(submitter, started, run, warmed=WARM_UP * processes)
    return outcome.figure(run.n, f"window {run.window}")


async def gateway_batched(run: BenchRun) -> Figure:
    async with served(run, run.gateway) as (_, submitter, processes):
        try:
            probe = batch_bodies(2, submitter.host, 2)
            await answered(submitter.submit_batches(probe, 1), processes, READY_TIMEOUT)
        except BatchesUnsupported:
            return Figure(missing="unsupported", note="the reply has no `results`")
        bodies = batch_bodies(run.n, submitter.host, run.batch)
        outcome = await timed(submitter.submit_batches(bodies, run.window), processes)
        queued = await submitter.queued()
    if queued != WARM_UP + 2 + run.n:
        raise RuntimeError(f"expected {WARM_UP + 2 + run.n} jobs queued, found {queued}")
    return outcome.figure(run.n, f"{run.batch} jobs a submission")


async def gateway_heartbeats(run: BenchRun) -> tuple[Figure, float]:
    """The single-job run with heartbeats flowing; (figure, heartbeats/s during it)."""
    async with (
        served(run, run.gateway) as (url, submitter, processes),
        heartbeats(url, HEARTBEATS_PER_SECOND) as meter,
    ):
        await meter.flowing(HEARTBEATS_PER_SECOND)  # about a second of them, first
        before = meter.latest
        outcome = await _timed_jobs(submitter, processes, run, warmed=WARM_UP)
        after = meter.latest
    beats = (after[0] - before[0]) / max(after[1] - before[1], 1e-3)
    return outcome.figure(run.n, f"{beats:,.0f} heartbeats/s during the run"), beats


class HeartbeatMeter:
    """The latest `(confirmed, monotonic seconds)` the heartbeat source printed."""

    def __init__(self) -> None:
        self.latest = (0, time.monotonic())
        self._changed = asyncio.Event()

    async def read(self, lines: asyncio.StreamReader) -> None:
        async for line in lines:
            count, at = line.split()
            self.latest = (int(count), float(at))
            self._changed.set()

    async def flowing(self, count: float) -> None:
        async with asyncio.timeout(READY_TIMEOUT):
            while self.latest[0] < count:
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def heartbeats(url: str, rate: float) -> AsyncIterator[HeartbeatMeter]:
    """bench.heartbeat_source publishing `rate` heartbeats/s on `url` while inside."""
    source = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.heartbeat_source", url, str(rate),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    meter = HeartbeatMeter()
    assert source.stdout is not None
    reader = asyncio.create_task(meter.read(source.stdout))
    try:
        yield meter
    finally:
        if source.returncode is None:
            source.terminate()
        await source.wait()
        await reader
