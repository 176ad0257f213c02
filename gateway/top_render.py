"""One frame of `sandfleet top`: its snapshot as three rich tables (hosts, workers, jobs).

As everywhere in the CLI (see `render`), what comes from events is put on screen as
`rich.text.Text`, never as markup.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from sandfleet.gateway.top import FleetSnapshot, HostRow, JobRow, WorkerRow

_STATE_STYLE = {"alive": "green", "lost": "bold red", "stopped": "dim"}


def top_frame(snapshot: FleetSnapshot) -> Group:
    title = Text(f"sandfleet top — {snapshot.at.strftime('%Y-%m-%d %H:%M:%S %Z')}", style="bold")
    return Group(
        title,
        hosts_table(snapshot.hosts),
        workers_table(snapshot.workers),
        jobs_table(snapshot.jobs),
    )


def hosts_table(hosts: list[HostRow]) -> Table:
    table = Table(title="hosts", title_justify="left")
    for column in ("host", "workers alive", "slots used", "slots free", "GPUs free", "GPUs held",
                   "jobs"):  # fmt: skip
        table.add_column(column)
    for row in hosts:
        table.add_row(
            Text(row.host),
            Text(f"{row.workers_alive}/{row.workers}"),
            Text(str(row.slots_used)),
            Text(str(row.slots_free)),
            Text(f"{row.gpus_free}/{row.gpus}"),
            Text(str(row.gpus_held)),
            Text(str(row.jobs)),
        )
    return table


def workers_table(workers: list[WorkerRow]) -> Table:
    table = Table(title="workers", title_justify="left")
    for column in ("host", "driver", "worker", "state", "slots used", "slots free", "jobs",
                   "last seen"):  # fmt: skip
        table.add_column(column)
    for row in workers:
        table.add_row(
            Text(row.host),
            Text(row.driver or "-"),
            Text(row.worker_id),
            Text(row.state, style=_STATE_STYLE.get(row.state, "")),
            Text(f"{row.slots_used}/{row.slots}"),
            Text(str(row.slots_free)),
            Text(str(row.jobs)),
            Text(f"{row.last_seen_seconds:.0f}s ago"),
        )
    return table


def jobs_table(jobs: list[JobRow]) -> Table:
    table = Table(title="jobs (begun, not ended)", title_justify="left")
    for column in ("job", "phase", "driver", "host", "worker", "GPUs", "submitted by", "age"):
        table.add_column(column)
    for row in jobs:
        table.add_row(
            Text(row.job_id),
            Text(row.phase),
            Text(row.driver or "-"),
            Text(row.host or "(queued)"),
            Text(row.worker_id or "-"),
            Text(",".join(row.gpus) or "-"),
            Text(row.submitted_by or "-"),
            Text(duration(row.age_seconds)),
        )
    return table


def duration(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m`: short enough for a column."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
