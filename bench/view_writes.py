"""What the gateway's job view costs in CPU per event it writes (issue 15).

    python -m bench.view_writes [-n 20000] [--burst 6] [--rate 600] [--prefill 0]

Two runs, each on a view file of its own under a temporary folder, holding --prefill
other jobs (written before the clock starts: a gateway's view holds the log's week):

  bulk     n `accepted` events (distinct job ids) and, for a quarter of them, a
           `running` and a `succeeded`, recorded as fast as the job index records a
           long log read at start-up (the event loop let run every 100 events, as
           the log's follower hands them over), then `flushed()`
  trickle  the same events recorded in bursts of --burst at --rate events/s, as a
           gateway admitting jobs live sees them

Each prints, in µs of CPU per event recorded: the view thread's, and the process's
(all threads) less what the run's own pacing (its sleeps) costs without a view.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sandfleet.common.events import Event, Phase
from sandfleet.gateway.job_view import JobView


def fleet_events(count: int, *, prefix: str = "job") -> list[Event]:
    now = datetime.now(UTC)
    events = [
        Event(job_id=f"{prefix}-{n}", phase=Phase.ACCEPTED, host="gw", driver="docker",
              submitted_by="alice", labels={"team": "a"} if n % 2 else None, timestamp=now)
        for n in range(count)
    ]  # fmt: skip
    for n in range(0, count, 4):
        worker = {"host": "h1", "driver": "docker", "worker_id": "h1-1", "timestamp": now}
        events.append(Event(job_id=f"{prefix}-{n}", phase=Phase.RUNNING, gpus=["0"], **worker))
        events.append(
            Event(job_id=f"{prefix}-{n}", phase=Phase.SUCCEEDED, exit_code=0,
                  timings={"queued": 0.1, "running": 1.0}, **worker)
        )  # fmt: skip
    return events


async def view_cpu(view: JobView) -> float:
    """The view thread's CPU seconds so far."""
    return await asyncio.get_running_loop().run_in_executor(view._thread, time.thread_time)


async def measure(
    events: list[Event], *, burst: int, rate: float, before: list[Event]
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        view = JobView(Path(folder) / "view.sqlite3", log="bench", max_age_seconds=3600, host="gw")
        await view.open()
        for offset, event in enumerate(before, start=1):
            view.record([event], offset)
            if offset % 100 == 0:
                await asyncio.sleep(0)
        await view.flushed()
        thread_before, process_before = await view_cpu(view), time.process_time()
        for offset, event in enumerate(events, start=len(before) + 1):
            view.record([event], offset)
            if burst and offset % burst == 0:
                await asyncio.sleep(burst / rate)
            elif not burst and offset % 100 == 0:
                await asyncio.sleep(0)
        await view.flushed()
        process = time.process_time() - process_before
        thread = await view_cpu(view) - thread_before
        await view.aclose()
    return process, thread


async def pacing_cpu(count: int, *, burst: int, rate: float) -> float:
    """The process CPU seconds of the trickle's sleeps alone, recording nothing."""
    before = time.process_time()
    for offset in range(1, count + 1):
        if burst and offset % burst == 0:
            await asyncio.sleep(burst / rate)
        elif not burst and offset % 100 == 0:
            await asyncio.sleep(0)
    return time.process_time() - before


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=6)
    parser.add_argument("--rate", type=float, default=600.0)
    parser.add_argument("--prefill", type=int, default=0)
    args = parser.parse_args()
    events, before = fleet_events(args.n), fleet_events(args.prefill, prefix="old")
    for name, burst in (("bulk", 0), ("trickle", args.burst)):
        process, thread = await measure(events, burst=burst, rate=args.rate, before=before)
        process -= await pacing_cpu(len(events), burst=burst, rate=args.rate)
        print(
            f"{name:8} {len(events)} events: view thread {thread / len(events) * 1e6:.0f},"
            f" process {process / len(events) * 1e6:.0f} µs/event"
        )


if __name__ == "__main__":
    asyncio.run(main())
