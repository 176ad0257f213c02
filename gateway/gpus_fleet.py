"""`sandfleet gpus --fleet`: every host's GPUs, with their health and drain state, from
the latest heartbeat of each host's workers (read from the event log through the broker)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.table import Table
from rich.text import Text

from sandfleet.common.events import Event, worker_state
from sandfleet.gateway.client import Client
from sandfleet.gateway.render import Output, make_console
from sandfleet.workers.gpus_cli import state_cell


def latest_per_host(beats: list[Event], now: datetime) -> list[Event]:
    """Each host's newest heartbeat, preferring its alive workers' (all of a host's
    workers read one claim store, so any of them shows the host's GPUs)."""
    chosen: dict[str, Event] = {}
    for beat in beats:
        known = chosen.get(beat.host)
        rank = (worker_state(beat, now) == "alive", beat.timestamp)
        if known is None or rank > (worker_state(known, now) == "alive", known.timestamp):
            chosen[beat.host] = beat
    return [chosen[host] for host in sorted(chosen)]


def fleet_report(beats: list[Event], now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "host": beat.host,
            "worker_id": beat.worker_id,
            "driver": beat.driver,
            "state": worker_state(beat, now),
            "at": beat.timestamp.isoformat(),
            "gpu_source": beat.health.gpu_source if beat.health else "",
            "gpu_health_source": beat.health.gpu_health_source if beat.health else "",
            "gpus_free": beat.health.gpus_free if beat.health else 0,
            "gpus": list(beat.health.gpus) if beat.health else [],
        }
        for beat in latest_per_host(beats, now)
    ]


def fleet_table(hosts: list[dict[str, Any]]) -> Table:
    table = Table(title="GPUs of the fleet (from heartbeats)", title_justify="left")
    for column in ("host", "index", "uuid", "name", "state", "worker", "health from"):
        table.add_column(column)
    for host in hosts:
        for gpu in host["gpus"]:
            cells = (host["host"], str(gpu.get("index", "?")), str(gpu.get("uuid", "?")),
                     str(gpu.get("name", "")))  # fmt: skip
            table.add_row(
                *map(Text, cells),
                state_cell(gpu),
                Text(host["state"], style="green" if host["state"] == "alive" else "red"),
                Text(host["gpu_health_source"] or "-"),
            )
    return table


def fleet_gpus(as_json: bool, since_minutes: int) -> None:
    async def read() -> list[Event]:
        async with Client() as client:
            return await client.workers(since=timedelta(minutes=since_minutes))

    beats = asyncio.run(read())
    hosts = fleet_report(beats, datetime.now(UTC))
    if as_json:
        Output(as_json).json_line({"hosts": hosts})
        return
    console = make_console()
    console.print(fleet_table(hosts))
    if not any(host["gpus"] for host in hosts):
        console.print(f"no host reported GPUs in the last {since_minutes} minutes")
