"""How the CLI shows events and replies to people (rich) and scripts (--json: streams
print one JSON object per line, one-shot commands one document, always on stdout).

Everything that comes from an event, a reply or the command line (job ids, reasons,
messages, field errors, labels, output) is put on screen as `rich.text.Text`, never
into a markup string: `[/bold]` in a rejected label must print as itself, not crash
the printer or restyle the line.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

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


class Output:
    """What a command shows: rich text for people, or JSON on stdout for scripts.
    Streams print one JSON object per line; one-shot commands print one document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = make_console()

    def reply(self, reply: SubmitReply) -> None:
        if self.as_json:
            self.json_line(reply.model_dump(mode="json", exclude_none=True))
        else:
            print_reply(self.console, reply)

    def event(self, event: Event) -> None:
        if self.as_json:
            self.json_line(event.model_dump(mode="json"))
        else:
            print_event(self.console, event)

    def json_line(self, document: Any) -> None:
        print(json.dumps(document), flush=True)


def make_console(*, stderr: bool = False) -> Console:
    """A console that takes strings literally too: no markup, emoji codes or highlighting."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)


def event_line(event: Event) -> Text:
    line = Text()
    line.append(event.timestamp.strftime("%H:%M:%S.%f")[:-3], style="dim")
    line.append(f" {event.phase.value:<10}", style=_PHASE_STYLE[event.phase])
    line.append(f" {event.job_id or event.worker_id or '-'} ")
    line.append(_where(event), style="dim")
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
    console.print(event_line(event), soft_wrap=True)
    for error in event.errors:
        console.print(Text(f"    {error.field}: {error.message}", style="red"), soft_wrap=True)
    if event.output and event.phase.is_terminal:
        for out_line in event.output.rstrip("\n").splitlines():
            console.print(Text(f"    | {out_line}", style="dim"), soft_wrap=True)


def reply_text(reply: SubmitReply) -> Text:
    if reply.duplicate:
        phase = reply.phase.value if reply.phase else "unknown"
        return Text.assemble(("already submitted", "yellow"), f" {reply.job_id}: it is {phase}")
    if reply.accepted:
        return Text.assemble(("accepted", "green"), f" {reply.job_id}")
    lines = Text.assemble(("rejected", "bold red"), f" {reply.job_id}")
    for error in reply.errors:
        lines.append(f"\n  {error.field}: {error.message}", style="red")
    return lines


def print_reply(console: Console, reply: SubmitReply) -> None:
    console.print(reply_text(reply), soft_wrap=True)


# A sweep's rejections shown one by one, at most; the rest are counted.
MAX_SHOWN_REJECTIONS = 20


def print_sweep(
    console: Console, lines: list[int], replies: list[SubmitReply], seconds: float
) -> None:
    """A sweep's outcome (`sandfleet submit -f FILE.jsonl`): counts, then each rejected
    request by its line."""
    accepted = sum(reply.accepted for reply in replies)
    duplicates = sum(bool(reply.duplicate) for reply in replies)
    rejected = [(line, reply) for line, reply in zip(lines, replies, strict=True)
                if not reply.accepted]  # fmt: skip
    summary = Text.assemble(
        f"{len(replies)} submitted in {seconds:.2f} s: ",
        (f"{accepted} accepted", "green"),
        f" ({duplicates} already submitted), " if duplicates else ", ",
        (f"{len(rejected)} rejected", "bold red" if rejected else ""),
    )
    console.print(summary, soft_wrap=True)
    for line, reply in rejected[:MAX_SHOWN_REJECTIONS]:
        console.print(Text(f"line {line}: ") + reply_text(reply), soft_wrap=True)
    if len(rejected) > MAX_SHOWN_REJECTIONS:
        console.print(Text(f"… and {len(rejected) - MAX_SHOWN_REJECTIONS} more rejected"))


def status_line(job_id: str, phase: Phase) -> Text:
    return Text.assemble(f"{job_id}: ", (phase.value, "bold"))


def history_table(job_id: str, events: list[Event]) -> Table:
    table = Table(title=Text(f"job {job_id}"), title_justify="left")
    for column in ("time", "phase", "where", "reason"):
        table.add_column(column)
    table.add_column("message", overflow="fold")  # folded, not cut: the message is the point
    for event in events:
        exit_note = f" (exit {event.exit_code})" if event.exit_code is not None else ""
        table.add_row(
            Text(event.timestamp.isoformat(timespec="milliseconds")),
            Text(event.phase.value, style=_PHASE_STYLE[event.phase]),
            Text(_where(event)),
            Text(event.reason),
            Text(event.message + exit_note),
        )
    return table


_STATE_STYLE = {"alive": "green", "lost": "bold red", "stopped": "dim"}


def workers_table(heartbeats: list[Event], now: datetime) -> Table:
    table = Table(title="workers", title_justify="left")
    columns = ("host", "driver", "worker", "state", "slots free", "GPUs free", "warm ready")
    for column in (*columns, "last seen"):
        table.add_column(column)
    for beat in heartbeats:
        state = worker_state(beat, now)
        health = beat.health
        table.add_row(
            Text(beat.host),
            Text(beat.driver or "-"),
            Text(beat.worker_id or "-"),
            Text(state, style=_STATE_STYLE[state]),
            Text(f"{health.free_slots}/{health.slots}" if health else "-"),
            Text(f"{health.gpus_free}/{len(health.gpus)}" if health else "-"),
            Text(_warm_ready(health.warm_pools) if health else "-"),
            Text(f"{(now - beat.timestamp).total_seconds():.0f}s ago"),
        )
    return table


def _warm_ready(pools: list[dict[str, Any]]) -> str:
    """Ready of target, all pools together ("-" for a worker without pools)."""
    if not pools:
        return "-"
    ready = sum(int(pool.get("ready", 0)) for pool in pools)
    return f"{ready}/{sum(int(pool.get('target', 0)) for pool in pools)}"


def _where(event: Event) -> str:
    return f"{event.driver or '-'}@{event.host}"
