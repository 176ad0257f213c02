"""`sandfleet keys generate` and `sandfleet broker setup`: an operator's one-time set-up
of the fleet's trust (SECURITY.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.table import Table

from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys, key_id, load_public_key
from sandfleet.gateway.broker_setup import (
    DEFAULT_ADMIN_URL,
    CredentialsFile,
    FleetUsers,
    set_up_broker,
)
from sandfleet.gateway.exits import exits_mapped
from sandfleet.gateway.render import make_console
from sandfleet.workers import registry

keys_app = typer.Typer(help="The gateway's signing keys.", no_args_is_help=True)
broker_app = typer.Typer(help="The fleet's broker accounts.", no_args_is_help=True)


class BrokerAdminSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SANDFLEET_", frozen=True, extra="ignore")

    # RabbitMQ's management HTTP API, as a user allowed to create users and vhosts.
    broker_admin_url: str = DEFAULT_ADMIN_URL
    broker_credentials: Path = Field(
        default_factory=lambda: Path.home() / ".config" / "sandfleet" / "broker-users.json"
    )


def keys_generate(
    directory: Annotated[Path, typer.Argument(help="Where to write signing.key and signing.pub.")],
) -> None:
    """Write a new Ed25519 key pair: DIR/signing.key (0600; the gateway's
    SANDFLEET_SIGNING_KEY) and DIR/signing.pub (the workers' SANDFLEET_TRUSTED_KEYS).
    An existing pair is never overwritten."""
    try:
        private, public = generate_keys(directory)
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc), param_hint="DIR") from None
    console = make_console()
    console.print(f"private key {private} (SANDFLEET_SIGNING_KEY, for the gateway)")
    console.print(f"public key  {public} (SANDFLEET_TRUSTED_KEYS, for every worker)")
    console.print(f"key id      {key_id(load_public_key(public))}")


HostsOption = Annotated[
    list[str],
    typer.Option("--host", help="A worker host to make an account for (repeatable)."),
]
SubmittersOption = Annotated[
    list[str],
    typer.Option("--submitter", help="A submitter's login to make (repeatable)."),
]
DriversOption = Annotated[
    list[str],
    typer.Option(
        "--driver", help="Drivers the worker accounts serve (repeatable; default: all installed)."
    ),
]


def broker_setup(
    host: HostsOption = [],  # noqa: B006 (typer reads the default; it is never mutated)
    submitter: SubmittersOption = [],  # noqa: B006
    driver: DriversOption = [],  # noqa: B006
    rotate: Annotated[bool, typer.Option(help="Give every named user a new password.")] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print {"gateway", "observer", "admin", "workers": {HOST: URL}, '
            '"submitters": {NAME: URL}, "policies": {NAME: {"pattern", "apply-to", '
            '"priority", "definition"}}} and nothing else.',
        ),
    ] = False,
) -> None:
    """Create, idempotently, one broker user per role in the fleet's vhost (from
    SANDFLEET_BROKER_URL) with least privilege, and put the queues' limits there as
    policies (SANDFLEET_JOB_DELIVERY_LIMIT, SANDFLEET_EVENTS_MAX_AGE,
    SANDFLEET_LOGS_MAX_AGE: run it again after changing one), through the management API
    at SANDFLEET_BROKER_ADMIN_URL; declare the shared topology; print each role's URL.
    Passwords are kept in SANDFLEET_BROKER_CREDENTIALS (0600)."""
    admin = BrokerAdminSettings()
    drivers = driver or list(registry.installed())
    try:
        users = asyncio.run(
            set_up_broker(
                Settings(),
                admin_url=admin.broker_admin_url,
                credentials=CredentialsFile(admin.broker_credentials),
                hosts=host,
                submitters=submitter,
                drivers=drivers,
                rotate=rotate,
            )
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if as_json:
        print(json.dumps(users.as_json()), flush=True)
    else:
        _print_users(users)


def _print_users(users: FleetUsers) -> None:
    table = Table("role", "name", "AMQP URL")
    table.add_row("gateway", "", users.gateway)
    table.add_row("observer", "", users.observer)
    table.add_row("admin", "", users.admin)
    for name, url in users.workers.items():
        table.add_row("worker", name, url)
    for name, url in users.submitters.items():
        table.add_row("submitter", name, url)
    make_console().print(table)


# Registered here, wrapped so their errors end as one line and an exit code.
keys_app.command("generate")(exits_mapped(keys_generate))
broker_app.command("setup")(exits_mapped(broker_setup))
