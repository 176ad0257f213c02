"""Gateway throughput beside what the broker and the alternatives reach, in one run.

    python -m bench.gateway_throughput [-n 5000] [--window 256] [--batch 100]
        [--log-events 1000000] [--skip SCENARIO ...]

Each scenario runs in a throwaway vhost of its own (rabbitmqctl), on the broker of
SANDFLEET_BROKER_URL, one after another, and the figures come out side by side:

  raw         N confirmed persistent publishes of the job requests to a quorum queue,
              `--window` in flight (no gateway at all)
  (limit)     raw ÷ 3: each admission costs three confirmed publishes (the `accepted`
              event, the job, the reply) plus a delivery
  relay       bench.naive_relay: consumes sandfleet.submit and, one message at a time,
              publishes the event (confirmed), the job (confirmed), replies, acks
  celery      Celery's apply_async, publisher confirms, quorum queue; one thread calling
              it in a loop (bench.celery_baseline); needs `pip install .[bench]`
  single      N submissions through a `sandfleet gateway` process, `--window` in flight,
              each answered `accepted`, all N jobs then in the job queue
  batched     the same N jobs in submissions of `--batch` (`{"jobs": [...]}`, answered
              `{"results": [...]}`); "unsupported" from a gateway without batches
  heartbeats  single, with 1,000 worker heartbeats/s published to the event log
              (bench.heartbeat_source); the rate they reached is printed
  two         single, with two gateway processes consuming together
  startup     a gateway's launch-to-first-reply with an empty log, then with
              `--log-events` events in it (first time, then restarted), and its RSS

Every client of a gateway (and of the relay) is the same: a submission carries reply_to
and a correlation id, and its reply is checked. Every gateway gets a signing key (made
per run) and a job view file of its own. Issue 15's goals are marked met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable

from rich.console import Console

from bench.broker_tools import broker_version
from bench.gateway_processes import GatewayKit
from bench.startup_scenario import startup
from bench.throughput_scenarios import (
    BenchRun,
    celery,
    gateway,
    gateway_batched,
    gateway_heartbeats,
    raw,
    relay,
)
from sandfleet.common.settings import Settings
from tests.support.throughput_goals import (
    Figure,
    Results,
    Scenario,
    goals_table,
    rates_table,
    startup_table,
)

SKIPPABLE = [s.value for s in Scenario if s is not Scenario.LIMIT]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5000, help="jobs per scenario (default 5000)")
    parser.add_argument(
        "--window", type=int, default=256, help="submissions/publishes in flight (default 256)"
    )
    parser.add_argument("--batch", type=int, default=100, help="jobs a batch (default 100)")
    parser.add_argument(
        "--log-events",
        type=int,
        default=1_000_000,
        help="events in the log for the start-up scenario (default 1,000,000)",
    )
    parser.add_argument("--skip", nargs="+", default=[], choices=SKIPPABLE, metavar="SCENARIO",
                        help=f"scenarios to leave out: {', '.join(SKIPPABLE)}")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("n", "window", "batch", "log_events"):
        if not 1 <= getattr(args, name) <= 100_000_000:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 100,000,000")
    return args


async def measured(name: Scenario, work: Callable[[], Awaitable[Figure]], results: Results) -> None:
    """Run one scenario; a failure is that scenario's figure, not the end of the run."""
    print(f"… {name.value}", file=sys.stderr, flush=True)
    try:
        figure = await work()
    except Exception as exc:  # reported in the table and the exit status
        figure = Figure(missing="failed", note=f"{type(exc).__name__}: {exc}"[:200])
        results.failed.append(name.value)
    results.figures[name] = figure
    # As it comes, so an interrupted run still shows what it measured.
    shown = f"{figure.rate:,.0f}/s" if figure.rate is not None else figure.missing
    print(f"  {name.value}: {shown} {figure.note}", file=sys.stderr, flush=True)


async def run_all(run: BenchRun, skip: set[str], log_events: int) -> Results:
    results = Results()
    plain: list[tuple[Scenario, Callable[[], Awaitable[Figure]]]] = [
        (Scenario.RAW, lambda: raw(run)),
        (Scenario.RELAY, lambda: relay(run)),
        (Scenario.CELERY, lambda: celery(run)),
        (Scenario.SINGLE, lambda: gateway(run)),
        (Scenario.BATCHED, lambda: gateway_batched(run)),
    ]
    for name, work in plain:
        if name.value not in skip:
            await measured(name, work, results)
    if Scenario.HEARTBEATS.value not in skip:

        async def with_heartbeats() -> Figure:
            figure, results.heartbeat_rate = await gateway_heartbeats(run)
            return figure

        await measured(Scenario.HEARTBEATS, with_heartbeats, results)
    if Scenario.TWO.value not in skip:
        await measured(Scenario.TWO, lambda: gateway(run, processes=2), results)
    if Scenario.STARTUP.value not in skip:
        print(f"… {Scenario.STARTUP.value}", file=sys.stderr, flush=True)
        try:
            results.startup = await startup(run, log_events)
        except Exception as exc:  # reported, and in the exit status
            print(f"startup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            results.failed.append(Scenario.STARTUP.value)
    return results


async def bench(args: argparse.Namespace, kit: GatewayKit) -> Results:
    # SIGTERM ends the run as Ctrl-C does: every scenario's processes and vhost go.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    url = Settings().broker_url
    print(f"machine: {os.cpu_count()} cores; broker: {await broker_version(url)}")
    print(f"jobs per scenario: {args.n:,}, {args.window} in flight, batches of {args.batch}")
    run = BenchRun(url, args.n, args.window, args.batch, kit)
    return await run_all(run, set(args.skip), args.log_events)


def main() -> None:
    args = parse_args()
    kit = GatewayKit()
    try:
        results = asyncio.run(bench(args, kit))
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Every scenario's processes and vhost went on the way out.
        raise SystemExit("interrupted (processes stopped, vhosts deleted)") from None
    finally:
        shutil.rmtree(kit.folder, ignore_errors=True)
    console = Console(width=max(120, shutil.get_terminal_size().columns))
    console.print(rates_table(results))
    if results.startup is not None:
        console.print(startup_table(results.startup))
    console.print(goals_table(results))
    if results.failed:
        raise SystemExit(f"failed: {', '.join(results.failed)} (the notes above say why)")


if __name__ == "__main__":
    main()
