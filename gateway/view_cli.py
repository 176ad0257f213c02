"""`sandfleet status | jobs | stats`: the fleet's jobs as the gateways' job views have them
(sandfleet.gateway.job_view). `status` falls back to the event log when no gateway
answers, and says so."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from sandfleet.common.errors import FleetUnreachable, JobNotFound, SandfleetError
from sandfleet.common.events import STAGES, Event, Phase
from sandfleet.common.models import field_errors
from sandfleet.common.view_queries import (
    FleetStats,
    JobDetail,
    JobSummary,
    StageStats,
    ViewQuery,
    ViewReply,
    ViewStatus,
    label_filters,
    since_seconds,
)
from sandfleet.gateway.client import Client
from sandfleet.gateway.render import Output, history_table, make_console, status_line

DocumentJson = Annotated[bool, typer.Option("--json", help="JSON for scripts: one document.")]
Since = Annotated[
    str | None, typer.Option(help="Only the last while: 30s, 15m, 1h, 2d, 1w.", show_default=False)
]


# A gateway answers from its view in milliseconds; past this, the log is the quicker way.
VIEW_TIMEOUT_SECONDS = 5.0


class QueryRefused(SandfleetError):
    """The gateway refused a query (its errors name the fields)."""


def status(
    job_id: Annotated[str, typer.Argument(help="The job to look up.")],
    as_json: DocumentJson = False,
) -> None:
    """A job's phase, host, worker, GPUs, exit code, timings and history, from a gateway's
    job view; from the event log if no gateway answers (exit 4 if it has none)."""
    found = asyncio.run(_look_up(job_id))
    if isinstance(found, JobDetail):
        if as_json:
            Output(as_json).json_line(found.model_dump(mode="json"))
        else:
            _print_job(found)
        return
    _print_history(job_id, found, as_json)


async def _look_up(job_id: str) -> JobDetail | list[Event]:
    """The job from a gateway's view, or else its events in the log."""
    async with Client() as client:
        try:
            reply = await client.status(job_id, timeout=VIEW_TIMEOUT_SECONDS)
        except FleetUnreachable as exc:
            make_console(stderr=True).print(f"sandfleet: {exc}; reading the event log instead")
        else:
            if reply.job is not None:
                return reply.job
            # The view holds accepted jobs only: an id that was only ever rejected is in
            # the log alone.
        return await client.history(job_id)


def jobs(
    phase: Annotated[Phase | None, typer.Option(help="Only jobs in this phase.")] = None,
    driver: Annotated[str | None, typer.Option(help="Only this driver's jobs.")] = None,
    host: Annotated[str | None, typer.Option(help="Only jobs on this worker host.")] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Only jobs with label key=value (repeatable).")
    ] = None,
    submitted_by: Annotated[str | None, typer.Option(help="Only this login's jobs.")] = None,
    since: Since = None,
    limit: Annotated[int, typer.Option(help="At most this many (1 to 1000).")] = 50,
    as_json: DocumentJson = False,
) -> None:
    """Jobs, newest first, from a gateway's job view."""
    query = _query(
        kind="jobs", phase=phase, driver=driver, host=host, submitted_by=submitted_by,
        labels=_labels(label or []), since_seconds=_since(since), limit=limit,
    )  # fmt: skip
    reply = asyncio.run(_ask(lambda client: client.query(query)))
    listed = reply.jobs or []
    if as_json:
        Output(as_json).json_line([job.model_dump(mode="json") for job in listed])
        return
    console = make_console()
    console.print(_jobs_table(listed))
    if reply.truncated:
        console.print("(more jobs matched than fit in one reply: narrow the query)")


def stats(since: Since = None, as_json: DocumentJson = False) -> None:
    """p50/p95/p99 seconds of each stage of ended jobs' lives, overall, per driver and host."""
    query = _query(kind="stats", since_seconds=_since(since))
    reply = asyncio.run(_ask(lambda client: client.query(query)))
    fleet = reply.stats or FleetStats(jobs=0)
    if as_json:
        Output(as_json).json_line(fleet.model_dump(mode="json"))
        return
    make_console().print(_stats_table(fleet))


async def _ask(question: Callable[[Client], Any]) -> ViewReply:
    async with Client() as client:
        reply: ViewReply = await question(client)
    if reply.status is ViewStatus.REJECTED:
        raise QueryRefused("the gateway refused the query: " + "; ".join(map(str, reply.errors)))
    return reply


def _query(**fields: Any) -> ViewQuery:
    try:
        return ViewQuery(**fields)
    except ValidationError as exc:
        raise typer.BadParameter("; ".join(map(str, field_errors(exc)))) from None


def _since(text: str | None) -> float | None:
    try:
        return None if text is None else since_seconds(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None


def _labels(pairs: list[str]) -> dict[str, str]:
    try:
        return label_filters(pairs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--label") from None


def _print_history(job_id: str, events: list[Event], as_json: bool) -> None:
    current = events[-1].phase if events else None
    if as_json:
        Output(as_json).json_line({
            "job_id": job_id,
            "phase": current,
            "events": [e.model_dump(mode="json") for e in events],
        })  # fmt: skip
    elif current is not None:
        console = make_console()
        console.print(status_line(job_id, current))
        console.print(history_table(job_id, events))
    if current is None:
        raise JobNotFound(job_id)


def _print_job(job: JobDetail) -> None:
    console = make_console()
    console.print(status_line(job.job_id, job.phase))
    facts = {
        "driver": job.driver, "host": job.host, "worker": job.worker_id,
        "gpus": ", ".join(job.gpus) or None, "exit code": job.exit_code,
        "submitted by": job.submitted_by,
        "labels": ", ".join(f"{k}={v}" for k, v in job.labels.items()) or None,
        "timings": ", ".join(f"{s} {v:.3f}s" for s, v in (job.timings or {}).items()) or None,
    }  # fmt: skip
    for name, value in facts.items():
        if value is not None:
            console.print(f"  {name}: {value}")
    table = Table(title=Text(f"job {job.job_id}"), title_justify="left")
    for column in ("time", "phase", "where", "reason", "message"):
        table.add_column(column, overflow="fold")
    for entry in job.events:
        where = entry.host + (f"/{entry.worker_id}" if entry.worker_id else "")
        when = entry.timestamp.isoformat(timespec="milliseconds")
        table.add_row(when, entry.phase.value, where, entry.reason, entry.message)
    console.print(table)


def _jobs_table(listed: list[JobSummary]) -> Table:
    table = Table()
    for column in ("job", "phase", "driver", "host", "submitted by", "submitted", "exit"):
        table.add_column(column, overflow="fold")
    for job in listed:
        table.add_row(
            job.job_id, job.phase.value, job.driver or "", job.host or "",
            job.submitted_by or "", job.submitted_at.isoformat(timespec="seconds"),
            "" if job.exit_code is None else str(job.exit_code),
        )  # fmt: skip
    return table


def _stats_table(fleet: FleetStats) -> Table:
    table = Table(title=Text(f"{fleet.jobs} ended jobs with timings"), title_justify="left")
    for column in ("over", "stage", "count", "p50 s", "p95 s", "p99 s"):
        table.add_column(column)
    groups: list[tuple[str, dict[str, StageStats]]] = [("fleet", fleet.stages)]
    groups += [(f"driver {name}", s) for name, s in fleet.by_driver.items()]
    groups += [(f"host {name}", s) for name, s in fleet.by_host.items()]
    for over, stages in groups:
        for stage in STAGES:
            if (numbers := stages.get(stage)) is not None:
                table.add_row(
                    over, stage, str(numbers.count),
                    f"{numbers.p50:.3f}", f"{numbers.p95:.3f}", f"{numbers.p99:.3f}",
                )  # fmt: skip
    return table
