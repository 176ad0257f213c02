"""`sandfleet worker`: run one driver's worker on this host."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandfleet.common.errors import SandfleetError
from sandfleet.common.lifecycle import until_signalled
from sandfleet.common.logs import setup_logging
from sandfleet.common.metrics import MetricsPort, metrics_served
from sandfleet.common.settings import SandboxPolicy, Settings
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost, DriverPlugin, SandboxDriver
from sandfleet.workers.gpu.claims import GpuClaimStore, worker_alive
from sandfleet.workers.gpu.inventory import GpuInventory, discover
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


def gpus(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """This host's GPUs, their NUMA nodes, NVLink peers and MIG instances, and who holds
    each (every driver's claims, since when)."""
    settings = Settings()
    inventory = discover(settings.gpu_inventory, cdi_kind=settings.cdi_kind)
    rows = _gpu_rows(settings, inventory)
    if as_json:
        print(json.dumps({"host": settings.host, "source": inventory.source, "gpus": rows}))
        return
    # Cells are Text, never markup: a GPU name or job id prints as itself.
    console = Console(markup=False, emoji=False, highlight=False)
    title = Text(f"GPUs on {settings.host} (from {inventory.source})")
    table = Table(title=title, title_justify="left")
    columns = ("index", "uuid", "pci", "name", "numa", "nvlink", "held by", "driver", "since")
    for column in columns:
        table.add_column(column)
    index_of = {row["uuid"]: row["index"] for row in rows}
    for row in rows:
        peers = ",".join(str(i) for i in sorted(index_of.get(p, -1) for p in row["nvlink_peers"]))
        numa = "" if row["numa_node"] is None else str(row["numa_node"])
        cells = (row["index"], row["uuid"], row["pci_bus_id"], row["name"], numa, peers)
        in_part = any(mig["claim"] for mig in row["mig"])
        _add_gpu_row(table, cells, row["claim"], free="MIG instances held" if in_part else "free")
        for mig in row["mig"]:
            cells = (f"  {mig['cdi_name']}", mig["uuid"], "", f"MIG {mig['profile']}", "", "")
            _add_gpu_row(table, cells, mig["claim"])
    console.print(table)
    if not rows:
        console.print("no GPUs found (NVML, nvidia-smi and SANDFLEET_GPU_INVENTORY gave none)")


def _gpu_rows(settings: Settings, inventory: GpuInventory) -> list[dict[str, Any]]:
    """Each GPU's record and claim; each of its MIG instances' too (under `mig`)."""
    held = [
        (gpu, device, claim)
        for claim in GpuClaimStore(settings.state_dir).claims()
        for gpu, device in zip(claim.gpus, claim.devices, strict=True)
    ]
    claims = {
        gpu: None if claim is None else {
            "job_id": claim.job_id,
            "driver": claim.driver,
            "worker_id": claim.worker_id,
            "worker_alive": worker_alive(settings.state_dir, claim.worker_id),
            "sandbox_id": claim.sandbox_id,
            "device": device,
            "since": claim.claimed_at,
        }
        for gpu, device, claim in held
    }  # fmt: skip
    rows = []
    for gpu in inventory:
        row = {**gpu.as_dict(), "cdi_names": list(gpu.cdi_names(settings.cdi_kind))}
        row["claim"] = claims.get(gpu.uuid)
        row["mig"] = [
            {
                **m.as_dict(),
                "cdi_names": list(m.cdi_names(settings.cdi_kind)),
                "claim": claims.get(m.uuid),
            }
            for m in gpu.mig
        ]
        rows.append(row)
    return rows


def _add_gpu_row(
    table: Table, cells: tuple[Any, ...], claim: dict[str, Any] | None, *, free: str = "free"
) -> None:
    style = "green" if free == "free" else "yellow"
    holder = Text(free, style=style) if claim is None else Text(claim["job_id"])
    if claim is not None and not claim["worker_alive"]:
        holder.append(" (worker gone)", style="yellow")
    held = (holder, claim["driver"] if claim else "", claim["since"] if claim else "")
    table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in (*cells, *held)))
