"""`sandfleet logs`: a job's output, from the log stream."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer

from sandfleet.gateway.client import Client
from sandfleet.gateway.exits import ExitCode


def logs(
    job_id: Annotated[str, typer.Argument(help="The job whose output to show.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Go on as it prints, until the job ends.")
    ] = False,
    tail: Annotated[
        int | None, typer.Option(min=0, help="Only the last N lines printed so far.")
    ] = None,
) -> None:
    """A job's output, stdout and stderr together (exit 4 if the event log has no such job)."""

    async def show() -> None:
        async with Client() as client:
            async for line in client.logs(job_id, follow=follow, tail=tail):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()  # a follower sees each line as it comes

    asyncio.run(show())
    raise typer.Exit(ExitCode.SUCCEEDED)
