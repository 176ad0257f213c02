"""The `sandfleet` command: the one place that sees both the gateway and the workers."""

from __future__ import annotations

from typing import Annotated

import typer

from sandfleet import __version__
from sandfleet.gateway import cli as gateway_cli
from sandfleet.gateway import logs_cli, operator_cli, top_cli, view_cli
from sandfleet.gateway.exits import exits_mapped
from sandfleet.gateway.gpus_fleet import fleet_gpus
from sandfleet.workers import cli as workers_cli
from sandfleet.workers import gpus_cli

app = typer.Typer(
    name="sandfleet",
    help="Run sandboxes (containers and VMs, with or without GPUs) on a fleet of hosts.",
    no_args_is_help=True,
    add_completion=True,
    # A failing command says what failed in one line (sandfleet.gateway.exits); a
    # traceback, if one still escapes, should be Python's plain one, not pages of locals.
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"sandfleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Run sandboxes (containers and VMs, with or without GPUs) on a fleet of hosts."""


gpus_app = typer.Typer(help="GPUs: this host's (run on it), or the fleet's (--fleet).")


def gpus(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    fleet: Annotated[
        bool, typer.Option("--fleet", help="Every host's GPUs, from their workers' heartbeats.")
    ] = False,
    since: Annotated[
        int, typer.Option(min=1, help="With --fleet: heartbeats of this many minutes back.")
    ] = 10,
) -> None:
    """This host's GPUs: health, drain state, who holds them (every driver's claims)."""
    if ctx.invoked_subcommand is not None:
        return
    if fleet:
        fleet_gpus(as_json, since)
    else:
        gpus_cli.local_gpus(as_json)


gpus_app.callback(invoke_without_command=True)(exits_mapped(gpus))
gpus_app.command()(exits_mapped(gpus_cli.drain))
gpus_app.command()(exits_mapped(gpus_cli.undrain))
gpus_app.command()(exits_mapped(gpus_cli.healthy))

# Every command's errors become exit codes in one place: sandfleet.gateway.exits.
app.command()(exits_mapped(gateway_cli.gateway))
app.command(context_settings={"allow_interspersed_args": False})(exits_mapped(gateway_cli.submit))
app.command()(exits_mapped(gateway_cli.wait))
app.command()(exits_mapped(gateway_cli.watch))
app.command()(exits_mapped(view_cli.status))
app.command()(exits_mapped(view_cli.jobs))
app.command()(exits_mapped(view_cli.stats))
app.command()(exits_mapped(gateway_cli.workers))
app.command()(exits_mapped(gateway_cli.cancel))
app.command()(exits_mapped(top_cli.top))
app.command()(exits_mapped(logs_cli.logs))
app.command()(exits_mapped(workers_cli.worker))
app.add_typer(gpus_app, name="gpus")
app.add_typer(operator_cli.keys_app, name="keys")
app.add_typer(operator_cli.broker_app, name="broker")


def main() -> None:
    app()
