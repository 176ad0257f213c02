"""`sandfleet gpus [--json] | drain GPU | undrain GPU | healthy GPU`: this host's GPUs,
as its claim store says (run on the GPU host; `--fleet`: `sandfleet.gateway.gpus_fleet`).

A drain keeps new claims off a GPU; jobs already running on it run on. `healthy`
clears an unhealthy mark (the NVML watcher's, after a GPU reset, or one made by hand).
"""

from __future__ import annotations

import getpass
import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandfleet.common.errors import SandfleetError
from sandfleet.common.settings import Settings
from sandfleet.workers.gpu.claims import GpuClaimStore, worker_alive
from sandfleet.workers.gpu.inventory import (
    Gpu,
    GpuInventory,
    InventoryError,
    MigDevice,
    UnknownGpu,
    discover,
)

GpuArgument = Annotated[
    str, typer.Argument(help="The GPU, by any alias: index, UUID, PCI address or CDI name.")
]


def _host() -> tuple[Settings, GpuInventory, GpuClaimStore]:
    settings = Settings()
    try:
        inventory = discover(settings.gpu_inventory, cdi_kind=settings.cdi_kind)
    except InventoryError as exc:  # a static inventory file that does not read
        raise SandfleetError(f"SANDFLEET_GPU_INVENTORY: {exc}") from None
    return settings, inventory, GpuClaimStore(settings.state_dir)


def _resolve(settings: Settings, inventory: GpuInventory, alias: str) -> Gpu | MigDevice:
    """A whole GPU (its state covers its MIG instances) or one MIG instance."""
    try:
        return inventory.resolve_claimable(alias)
    except UnknownGpu:
        known = ", ".join(str(gpu.index) for gpu in inventory) or "none"
        raise typer.BadParameter(
            f"no GPU {alias!r} on host {settings.host} (its GPUs: {known})", param_hint="GPU"
        ) from None


def _name(gpu: Gpu | MigDevice) -> str:
    if isinstance(gpu, MigDevice):
        return f"MIG instance {gpu.cdi_name} ({gpu.uuid}, of GPU {gpu.parent})"
    return f"GPU {gpu.index} ({gpu.uuid})"


def drain(
    gpu: GpuArgument,
    reason: Annotated[str, typer.Option(help="Why; shown with the GPU's state.")] = "",
) -> None:
    """Hand GPU out to no new job (jobs running on it run on), until `undrain`."""
    settings, inventory, store = _host()
    target = _resolve(settings, inventory, gpu)
    before = store.states().drained.get(target.uuid)
    after = store.drain(target.uuid, reason=reason, by=_operator()).drained[target.uuid]
    if before is not None:
        print(f"{_name(target)} was drained already (since {before.since}, by {before.by})")
    print(f"drained {_name(target)} on host {settings.host}: {after.reason or '(no reason)'}")
    held = [
        claim.job_id for claim in store.claims() if target.uuid in (*claim.gpus, *claim.physical)
    ]
    if held:
        print(f"job {', '.join(held)} holds it and runs on; no new job will get it")


def undrain(gpu: GpuArgument) -> None:
    """Hand GPU out to jobs again."""
    settings, inventory, store = _host()
    target = _resolve(settings, inventory, gpu)
    before = store.states().drained.get(target.uuid)
    states = store.undrain(target.uuid)
    if before is None:
        print(f"{_name(target)} on host {settings.host} was not drained")
    else:
        print(f"undrained {_name(target)} on host {settings.host} (drained since {before.since})")
    if target.uuid in states.unhealthy:
        why = states.unhealthy[target.uuid].reason
        print(f"it is still unhealthy ({why}): `sandfleet gpus healthy {gpu}` once it is fixed")


def healthy(gpu: GpuArgument) -> None:
    """Clear GPU's unhealthy mark (after a reset): jobs may get it again unless drained."""
    settings, inventory, store = _host()
    target = _resolve(settings, inventory, gpu)
    before = store.states().unhealthy.get(target.uuid)
    store.mark_healthy(target.uuid)
    if before is None:
        print(f"{_name(target)} on host {settings.host} was not marked unhealthy")
    else:
        print(f"cleared {_name(target)}'s unhealthy mark ({before.reason}, since {before.since})")


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid
        return "unknown"


def local_gpus(as_json: bool) -> None:
    """This host's GPUs, their NUMA nodes, NVLink peers, MIG instances and state, and
    who holds each (every driver's claims, since when)."""
    settings, inventory, store = _host()
    rows = _gpu_rows(settings, inventory, store)
    if as_json:
        print(json.dumps({"host": settings.host, "source": inventory.source, "gpus": rows}))
        return
    _print_local(settings, inventory, rows)


def _gpu_rows(
    settings: Settings, inventory: GpuInventory, store: GpuClaimStore
) -> list[dict[str, Any]]:
    """Each GPU's record, state and claim; each of its MIG instances' too (under `mig`)."""
    held = [
        (gpu, device, claim)
        for claim in store.claims()
        for gpu, device in zip(claim.gpus, claim.devices, strict=True)
    ]
    claims = {
        gpu: {
            "job_id": claim.job_id,
            "driver": claim.driver,
            "worker_id": claim.worker_id,
            "worker_alive": worker_alive(settings.state_dir, claim.worker_id),
            "sandbox_id": claim.sandbox_id,
            "device": device,
            "since": claim.claimed_at,
        }
        for gpu, device, claim in held
    }
    states = store.states()
    rows = []
    for gpu in inventory:
        row = {**gpu.as_dict(), "cdi_names": list(gpu.cdi_names(settings.cdi_kind))}
        row |= {**states.row(gpu.uuid), "claim": claims.get(gpu.uuid)}
        row["mig"] = [
            {
                **m.as_dict(),
                "cdi_names": list(m.cdi_names(settings.cdi_kind)),
                **states.row(m.uuid),
                "claim": claims.get(m.uuid),
            }
            for m in gpu.mig
        ]
        rows.append(row)
    return rows


def state_cell(row: dict[str, Any]) -> Text:
    """A GPU row's health and drain state, as one cell ("?" for a row that has none:
    a heartbeat of a worker from before GPU health)."""
    if "health" not in row:
        return Text("?", style="dim")
    cell = Text()
    if row["health"] == "unhealthy":
        cell.append(f"unhealthy: {row.get('health_reason') or ''}", style="bold red")
    if row.get("drained"):
        cell.append("; " if cell else "")
        cell.append(f"drained: {row.get('drain_reason') or ''}", style="yellow")
    return cell or Text("ok", style="green")


def _print_local(settings: Settings, inventory: GpuInventory, rows: list[dict[str, Any]]) -> None:
    # Cells are Text, never markup: a GPU name or job id prints as itself.
    console = Console(markup=False, emoji=False, highlight=False)
    title = Text(f"GPUs on {settings.host} (from {inventory.source})")
    table = Table(title=title, title_justify="left")
    columns = ("index", "uuid", "pci", "name", "numa", "nvlink", "state", "held by", "driver",
               "since")  # fmt: skip
    for column in columns:
        table.add_column(column)
    index_of = {row["uuid"]: row["index"] for row in rows}
    for row in rows:
        peers = ",".join(str(i) for i in sorted(index_of.get(p, -1) for p in row["nvlink_peers"]))
        numa = "" if row["numa_node"] is None else str(row["numa_node"])
        cells = (row["index"], row["uuid"], row["pci_bus_id"], row["name"], numa, peers,
                 state_cell(row))  # fmt: skip
        in_part = any(mig["claim"] for mig in row["mig"])
        _add_gpu_row(table, cells, row["claim"], free="MIG instances held" if in_part else "free")
        for mig in row["mig"]:
            cells = (f"  {mig['cdi_name']}", mig["uuid"], "", f"MIG {mig['profile']}", "", "",
                     state_cell(mig))  # fmt: skip
            _add_gpu_row(table, cells, mig["claim"])
    console.print(table)
    if not rows:
        console.print("no GPUs found (NVML, nvidia-smi and SANDFLEET_GPU_INVENTORY gave none)")


def _add_gpu_row(
    table: Table, cells: tuple[Any, ...], claim: dict[str, Any] | None, *, free: str = "free"
) -> None:
    style = "green" if free == "free" else "yellow"
    holder = Text(free, style=style) if claim is None else Text(claim["job_id"])
    if claim is not None and not claim["worker_alive"]:
        holder.append(" (worker gone)", style="yellow")
    held = (holder, claim["driver"] if claim else "", claim["since"] if claim else "")
    table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in (*cells, *held)))
