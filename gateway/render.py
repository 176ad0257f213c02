"""How the CLI shows events and replies to people (rich) and scripts (--json)."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandfleet.common.events import Event, Phase, worker_state
from sandfleet.common.models import SubmitReply

_PHASE_STYLE = {
    Phase.ACCEPTED: "cyan",
    Phase.REJECTED: "bold red",
    Phase.WAITING: "yellow",
    Phase.CLAIMED: "blue",
    Phase.STARTING: "blue",
    Phase.RUNNING: "bold blue",
    Phase.SUCCEEDED: "bold green",
    Phase.FAILED: "bold red",
    Phase.TIMED_OUT: "bold magenta",
    Phase.CANCELLED: "magenta",
    Phase.HEARTBEAT: "dim",
}


def event_line(event: Event) -> Text:
    where = f"{event.driver or '-'}@{event.host}"
    line = Text()
    line.append(event.timestamp.strftime("%H:%M:%S.%f")[:-3], style="dim")
    line.append(f" {event.phase.value:<10}", style=_PHASE_STYLE[event.phase])
    line.append(f" {event.job_id or event.worker_id or '-'} ")
    line.append(where, style="dim")
    if event.reason:
        line.append(f" {event.reason}")
    if event.exit_code is not None:
        line.append(f" exit={event.exit_code}")
    if event.gpus:
        line.append(f" gpus={','.join(event.gpus)}")
    if event.message:
        line.append(f" — {event.message}")
    if event.health is not None:
        line.append(f" slots {event.health.free_slots}/{event.health.slots} free")
    return line


def print_event(console: Console, event: Event) -> None:
    console.print(event_line(event), highlight=False, soft_wrap=True)
    for error in event.errors:
        console.print(f"    {error.field}: {error.message}", style="red", highlight=False)
    if event.output and event.phase.is_terminal:
        for out_line in event.output.rstrip("\n").splitlines():
            console.print(f"    | {out_line}", style="dim", highlight=False, markup=False)


def print_reply(console: Console, reply: SubmitReply) -> None:
    if reply.duplicate:
        phase = reply.phase.value if reply.phase else "unknown"
        console.print(f"[yellow]already submitted[/] {reply.job_id}: it is {phase}")
        return
    if reply.accepted:
        console.print(f"[green]accepted[/] {reply.job_id}")
        return
    console.print(f"[bold red]rejected[/] {reply.job_id}")
    for error in reply.errors:
        console.print(f"  {error.field}: {error.message}", style="red", highlight=False)


def history_table(job_id: str, events: list[Event]) -> Table:
    table = Table(title=f"job {job_id}", title_justify="left")
    for column in ("time", "phase", "where", "reason", "message"):
        table.add_column(column)
    for event in events:
        table.add_row(
            event.timestamp.isoformat(timespec="milliseconds"),
            Text(event.phase.value, style=_PHASE_STYLE[event.phase]),
            f"{event.driver or '-'}@{event.host}",
            event.reason,
            event.message + (f" (exit {event.exit_code})" if event.exit_code is not None else ""),
        )
    return table


_STATE_STYLE = {"alive": "green", "lost": "bold red", "stopped": "dim"}


def workers_table(heartbeats: list[Event], now: datetime) -> Table:
    table = Table(title="workers", title_justify="left")
    for column in ("host", "driver", "worker", "state", "slots free", "GPUs free", "last seen"):
        table.add_column(column)
    for beat in heartbeats:
        state = worker_state(beat, now)
        health = beat.health
        table.add_row(
            beat.host,
            beat.driver or "-",
            beat.worker_id or "-",
            Text(state, style=_STATE_STYLE[state]),
            f"{health.free_slots}/{health.slots}" if health else "-",
            f"{health.gpus_free}/{len(health.gpus)}" if health else "-",
            f"{(now - beat.timestamp).total_seconds():.0f}s ago",
        )
    return table
