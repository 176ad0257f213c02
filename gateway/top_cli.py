"""`sandfleet top`: the fleet live — hosts, workers, slots, GPUs and the jobs under way —
from the event log's recent history (`--since`), then its live events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.live import Live

from sandfleet.gateway.client import Client
from sandfleet.gateway.events_stream import EventStream
from sandfleet.gateway.render import Output
from sandfleet.gateway.top import FleetSnapshot, FleetView
from sandfleet.gateway.top_render import top_frame

Draw = Callable[[FleetSnapshot], None]


def top(
    since: Annotated[
        int,
        typer.Option(
            min=1, help="Read this many minutes of history first (jobs begun earlier are not seen)."
        ),
    ] = 10,
    refresh: Annotated[float, typer.Option(min=0.1, help="Seconds between frames.")] = 2.0,
    once: Annotated[bool, typer.Option(help="Print one frame and exit.")] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='JSON for scripts: {"at", "hosts", "workers", "jobs"}, one per frame '
            "(with --once, one document).",
        ),
    ] = False,
) -> None:
    """A live view of the fleet (Ctrl-C to stop): hosts, workers (alive, stopped, lost),
    slots and GPUs used and free, and the jobs that have begun and not ended."""
    out = Output(as_json)
    history = timedelta(minutes=since)
    if as_json or once:
        asyncio.run(_top(history, refresh, once, lambda shot: _print(out, shot)))
        return
    with Live(console=out.console, auto_refresh=False, screen=False) as live:
        asyncio.run(
            _top(history, refresh, once, lambda shot: live.update(top_frame(shot), refresh=True))
        )


def _print(out: Output, snapshot: FleetSnapshot) -> None:
    if out.as_json:
        out.json_line(snapshot.as_json())
    else:
        out.console.print(top_frame(snapshot))


async def _top(history: timedelta, refresh: float, once: bool, draw: Draw) -> None:
    view = FleetView(window=history)
    async with Client() as client, client.events(since=datetime.now(UTC) - history) as stream:
        async for event in stream.history():
            view.add(event)
        draw(view.snapshot(datetime.now(UTC)))
        if not once:
            await _follow(view, stream, refresh, draw)


async def _follow(view: FleetView, stream: EventStream, refresh: float, draw: Draw) -> None:
    """Feed live events to `view` and draw it every `refresh` seconds, until cancelled
    or the stream fails (its error is raised)."""

    async def feed() -> None:
        async for event in stream:
            view.add(event)

    feeder = asyncio.create_task(feed())
    try:
        while not feeder.done():
            # The frame rate, not a wait for something: a frame is due every `refresh`.
            await asyncio.wait({feeder}, timeout=refresh)
            draw(view.snapshot(datetime.now(UTC)))
        feeder.result()
    finally:
        feeder.cancel()
