"""The `sandfleet` command: the one place that sees both the gateway and the workers."""

from __future__ import annotations

import typer

from sandfleet.gateway import cli as gateway_cli
from sandfleet.workers import cli as workers_cli

app = typer.Typer(
    name="sandfleet",
    help="Run sandboxes (containers and VMs, with or without GPUs) on a fleet of hosts.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(gateway_cli.gateway)
app.command(context_settings={"allow_interspersed_args": False})(gateway_cli.submit)
app.command()(gateway_cli.watch)
app.command()(gateway_cli.status)
app.command()(gateway_cli.workers)
app.command()(gateway_cli.cancel)
app.command()(workers_cli.worker)
app.command()(workers_cli.gpus)


def main() -> None:
    app()
