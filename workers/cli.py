"""`sandfleet worker`: run one driver's worker on this host."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

import typer

from sandfleet.common.errors import SandfleetError
from sandfleet.common.lifecycle import until_signalled
from sandfleet.common.logs import setup_logging
from sandfleet.common.metrics import MetricsPort, metrics_served
from sandfleet.common.settings import SandboxPolicy, Settings
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost, DriverPlugin, SandboxDriver
from sandfleet.workers.runtime import Worker
from sandfleet.workers.warm_profiles import warm_profiles


def load_plugin(name: str) -> DriverPlugin[Any]:
    try:
        return registry.load(name)
    except (registry.UnknownDriver, registry.BrokenDriver) as exc:
        raise typer.BadParameter(str(exc), param_hint="--driver") from exc


def make_driver(plugin: DriverPlugin[Any], settings: Settings) -> SandboxDriver[Any]:
    """The driver, configured from its own SANDFLEET_<NAME>_* settings (in a running loop:
    drivers open their runtime's client)."""
    try:
        return plugin.from_environment(DriverHost(cdi_kind=settings.cdi_kind))
    except ImportError as exc:  # a native extra that is not installed
        raise typer.BadParameter(str(exc), param_hint="--driver") from exc


# What Docker and Podman name a container's host by default: its id's first 12 digits.
CONTAINER_ID_HOST_NAME = re.compile(r"[0-9a-f]{12}")


def require_host_name(settings: Settings) -> None:
    """A worker whose host name is a container's id must be told its host's name
    (SANDFLEET_HOST): that name is new with every container, so a restarted worker
    would serve another host queue and never take over its journal."""
    if "host" not in settings.model_fields_set and CONTAINER_ID_HOST_NAME.fullmatch(settings.host):
        raise SandfleetError(
            f"SANDFLEET_HOST is not set, and this host's name ({settings.host}) is a"
            " container's id, new with every container: set SANDFLEET_HOST to the"
            " machine's name"
        )


def _driver_help() -> str:
    names = ", ".join(registry.installed()) or "none installed"
    return f"Which registered driver this worker runs ({names})."


WarmOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="IMAGE=N",
        help="Keep N sandboxes of IMAGE started ahead of demand, for jobs with that image "
        "and no resources, block or GPUs of their own (repeatable; more profiles: "
        "SANDFLEET_WARM_POOLS).",
    ),
]


def worker(
    driver: Annotated[str, typer.Option(help=_driver_help())] = "docker",
    slots: Annotated[int, typer.Option(min=1, help="Jobs run at once (= the queue prefetch).")] = 1,
    on_shutdown: Annotated[
        SandboxPolicy | None,
        typer.Option(
            help="On SIGTERM, after the drain time: 'adopt' leaves running sandboxes for the "
            "next worker; 'stop' stops them (cancelled). Default: SANDFLEET_SHUTDOWN_POLICY."
        ),
    ] = None,
    on_takeover: Annotated[
        SandboxPolicy | None,
        typer.Option(
            help="Running sandboxes of jobs taken over from a worker that is gone: 'adopt' "
            "watches them to their end; 'stop' stops them (cancelled, StoppedOnTakeover). "
            "Default: SANDFLEET_TAKEOVER_POLICY."
        ),
    ] = None,
    drain_seconds: Annotated[
        float,
        typer.Option(
            help="On SIGTERM, seconds running jobs may finish before they are left to be adopted."
        ),
    ] = 30.0,
    metrics_port: MetricsPort = None,
    warm: WarmOption = None,
) -> None:
    """Run a worker: take jobs for DRIVER on this host, run them, report events."""
    policies = {
        "shutdown_policy": on_shutdown,
        "takeover_policy": on_takeover,
        "metrics_port": metrics_port,
    }
    settings = Settings().model_copy(update={k: v for k, v in policies.items() if v is not None})
    setup_logging(settings.log_level)
    require_host_name(settings)
    plugin = load_plugin(driver)
    profiles = warm_profiles(settings.warm_pools, warm or [])

    async def serve() -> None:
        sandbox_driver = make_driver(plugin, settings)
        try:
            w = Worker(
                settings, sandbox_driver, slots=slots, drain_seconds=drain_seconds, warm=profiles
            )
            # Served from before the worker connects: /healthz says 503 until it consumes.
            served = metrics_served(w.metrics.registry, settings, healthy=lambda: w.healthy)
            async with served, w:
                await w.serve_forever()
        finally:
            await sandbox_driver.aclose()

    asyncio.run(until_signalled(serve()))
