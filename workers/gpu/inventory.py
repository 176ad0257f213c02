"""The host's GPUs: one identity (UUID) per physical GPU, and its aliases; each GPU's
NUMA node, NVLink peers and MIG instances (claimable children, with aliases of their own).

Sources, in order: a static file (`SANDFLEET_GPU_INVENTORY`, which replaces discovery),
NVML (the optional `nvml` extra), `nvidia-smi -q -x` (with `nvidia-smi topo -m` for the
topology; it names no MIG instance UUIDs, so a GPU it reports in MIG mode has nothing
claimable), else no GPUs.

A GPU in MIG mode (`mig_enabled`) is never claimed whole by a count-only request, whether
or not any of its instances is known: its memory and SMs belong to its instances.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CDI_KIND = "nvidia.com/gpu"

# DDDD:BB:DD.F, with NVML's 8-digit domain (00000000:00:06.0) as the same address
_PCI = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<device>[0-9a-fA-F]{2})\.(?P<function>[0-7])"
)


# A MIG profile as NVML names it: 3g.40gb, 1g.10gb+me, 1c.3g.40gb.
MIG_PROFILE_PATTERN = r"^(?:[1-9]c\.)?[1-9]g\.[1-9][0-9]{0,3}gb(?:\+[a-z]{1,8})?$"
_MIG_PROFILE = re.compile(MIG_PROFILE_PATTERN)
# Patterns are matched whole (fullmatch): `$` alone would let a trailing newline through.
MIG_UUID = re.compile(r"MIG-[0-9A-Za-z/-]{1,80}")  # also the old MIG-GPU-…/gi/ci
_MIG_CDI_NAME = re.compile(r"[0-9]{1,3}:[0-9]{1,2}")  # nvidia-ctk's <gpu index>:<mig index>
# A GPU's UUID travels in every `claimed` event (`GpuPlacement`: at most 128 characters).
GPU_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
MAX_GPU_NAME = 256
# Bounds on a static file: NVML reports at most 18 NVLinks and 7 MIG instances per GPU,
# and no host has hundreds of GPUs (each claim's placement runs under the store's lock).
MAX_GPUS = 256
MAX_NVLINK_PEERS = 64
MAX_MIG_PER_GPU = 16
MAX_NUMA_NODE = 1023


class InventoryError(Exception):
    """An inventory source could not be read."""


class SourceAbsent(InventoryError):
    """This host has no such source (not installed, no driver): the next one is asked."""


def normalize_pci_address(address: str) -> str:
    """`00000000:00:06.0`, `0000:00:06.0` and `00:06.0` → `0000:00:06.0`."""
    match = _PCI.fullmatch(address.strip())
    if match is None:
        raise ValueError(f"{address!r} is not a PCI address (DDDD:BB:DD.F, e.g. 0000:2d:00.0)")
    domain = int(match["domain"] or "0", 16)
    if domain > 0xFFFF:
        raise ValueError(f"{address!r}: PCI domain {domain:#x} is out of range")
    return (
        f"{domain:04x}:{int(match['bus'], 16):02x}:"
        f"{int(match['device'], 16):02x}.{int(match['function'], 16):x}"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MigDevice:
    """One MIG instance: claimable on its own; it conflicts with its whole GPU only."""

    uuid: str  # MIG-…
    profile: str  # 3g.40gb
    cdi_name: str  # 0:1, as nvidia-ctk names it
    parent: str  # its GPU's UUID

    def cdi_names(self, kind: str = DEFAULT_CDI_KIND) -> tuple[str, str]:
        return f"{kind}={self.cdi_name}", f"{kind}={self.uuid}"

    def aliases(self, kind: str = DEFAULT_CDI_KIND) -> frozenset[str]:
        return frozenset({self.uuid, self.cdi_name, *self.cdi_names(kind)})

    def as_dict(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "profile": self.profile, "cdi_name": self.cdi_name}


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    index: int
    uuid: str
    name: str
    pci_bus_id: str  # normalised, DDDD:BB:DD.F
    minor: int | None = None
    numa_node: int | None = None
    nvlink_peers: tuple[str, ...] = ()  # UUIDs of GPUs this one has an NVLink to
    mig: tuple[MigDevice, ...] = field(default=())
    # In MIG mode: never claimed whole by a count-only request, even with no instance
    # known (none created yet, or a source that names none). Implied by `mig`.
    mig_enabled: bool = False

    def __post_init__(self) -> None:
        if self.mig and not self.mig_enabled:
            object.__setattr__(self, "mig_enabled", True)  # frozen: set once, here

    def cdi_names(self, kind: str = DEFAULT_CDI_KIND) -> tuple[str, str]:
        return f"{kind}={self.index}", f"{kind}={self.uuid}"

    def aliases(self, kind: str = DEFAULT_CDI_KIND) -> frozenset[str]:
        return frozenset({str(self.index), self.uuid, self.pci_bus_id, *self.cdi_names(kind)})

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "pci_bus_id": self.pci_bus_id,
            "minor": self.minor,
            "numa_node": self.numa_node,
            "nvlink_peers": list(self.nvlink_peers),
            "mig": [m.as_dict() for m in self.mig],
            "mig_enabled": self.mig_enabled,
        }


class UnknownGpu(LookupError):
    pass


@dataclass(frozen=True)
class GpuInventory:
    gpus: tuple[Gpu, ...]
    source: str
    cdi_kind: str = DEFAULT_CDI_KIND

    def __iter__(self) -> Iterator[Gpu]:
        return iter(self.gpus)

    def __len__(self) -> int:
        return len(self.gpus)

    def by_uuid(self, uuid: str) -> Gpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise UnknownGpu(uuid)

    @cached_property
    def _by_alias(self) -> dict[str, Gpu | MigDevice]:
        found: dict[str, Gpu | MigDevice] = {}
        for gpu in self.gpus:
            found |= dict.fromkeys(gpu.aliases(self.cdi_kind), gpu)
            for mig in gpu.mig:
                found |= dict.fromkeys(mig.aliases(self.cdi_kind), mig)
        return found

    def resolve_claimable(self, device_id: str) -> Gpu | MigDevice:
        """The whole GPU or the MIG instance behind any alias: CDI name (`…=0`,
        `…=0:1`, `…=<UUID>`), GPU or MIG UUID, index, or the GPU's PCI address."""
        found = self._by_alias.get(device_id)
        if found is None:
            with contextlib.suppress(ValueError):
                found = self._by_alias.get(normalize_pci_address(device_id))
        if found is None:
            raise UnknownGpu(device_id)
        return found

    def resolve(self, device_id: str) -> Gpu:
        """The physical GPU behind any whole-GPU alias: CDI name, UUID, index or PCI address."""
        found = self.resolve_claimable(device_id)
        if isinstance(found, MigDevice):
            raise UnknownGpu(f"{device_id} is a MIG instance, not a whole GPU")
        return found

    def mig_devices(self) -> Iterator[MigDevice]:
        for gpu in self.gpus:
            yield from gpu.mig


def _gpu(index: int, uuid: str, name: str, pci: str, minor: int | None) -> Gpu:
    if not GPU_UUID.fullmatch(uuid):
        raise ValueError(f"uuid {uuid!r} does not match {GPU_UUID.pattern}")
    if len(name) > MAX_GPU_NAME or not name.isprintable():
        raise ValueError(f"name: at most {MAX_GPU_NAME} printable characters")
    return Gpu(
        index=index, uuid=uuid, name=name, pci_bus_id=normalize_pci_address(pci), minor=minor
    )


def from_records(records: Iterable[dict[str, Any]]) -> tuple[Gpu, ...]:
    """GPUs from the static-file / nvml.json shape: index, uuid, name, pci_bus_id[, minor,
    numa_node, nvlink_peers (UUIDs), mig ([{uuid, profile, cdi_name}]), mig_enabled]."""
    gpus = []
    for position, record in enumerate(records):
        if position >= MAX_GPUS:
            raise InventoryError(f"gpus: more than {MAX_GPUS} GPUs")
        try:
            gpu = _gpu(
                int(record["index"]),
                str(record["uuid"]),
                str(record.get("name", "")),
                str(record["pci_bus_id"]),
                None if record.get("minor") is None else int(record["minor"]),
            )
            gpus.append(_with_topology(gpu, record, path=f"gpus[{position}]"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InventoryError(f"gpus[{position}]: {exc}") from exc
    check_unique(gpus)
    return tuple(sorted(_known_peers_only(gpus), key=lambda g: g.index))


def _with_topology(gpu: Gpu, record: dict[str, Any], *, path: str) -> Gpu:
    numa = record.get("numa_node")
    if numa is not None and (type(numa) is not int or not 0 <= numa <= MAX_NUMA_NODE):
        raise InventoryError(f"{path}.numa_node: {numa!r} is not a node number 0-{MAX_NUMA_NODE}")
    peers = record.get("nvlink_peers") or []
    if not isinstance(peers, list) or len(peers) > MAX_NVLINK_PEERS:
        raise InventoryError(f"{path}.nvlink_peers: a list of at most {MAX_NVLINK_PEERS} UUIDs")
    migs = record.get("mig") or []
    if not isinstance(migs, list) or len(migs) > MAX_MIG_PER_GPU:
        raise InventoryError(f"{path}.mig: a list of at most {MAX_MIG_PER_GPU} instances")
    enabled = record.get("mig_enabled", bool(migs))
    if type(enabled) is not bool or (migs and not enabled):
        raise InventoryError(f"{path}.mig_enabled: true or false (true where mig lists any)")
    return replace(
        gpu,
        numa_node=numa,
        nvlink_peers=tuple(dict.fromkeys(str(p) for p in peers if str(p) != gpu.uuid)),
        mig=tuple(_mig(m, gpu, path=f"{path}.mig[{i}]") for i, m in enumerate(migs)),
        mig_enabled=enabled,
    )


def _mig(record: Any, gpu: Gpu, *, path: str) -> MigDevice:
    if not isinstance(record, dict):
        raise InventoryError(f"{path}: expected {{uuid, profile, cdi_name}}")
    checks = (("uuid", MIG_UUID), ("profile", _MIG_PROFILE), ("cdi_name", _MIG_CDI_NAME))
    for key, pattern in checks:
        value = record.get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise InventoryError(f"{path}.{key}: {value!r} does not match {pattern.pattern}")
    # An instance named under another GPU's index would alias that GPU's instance.
    if record["cdi_name"].partition(":")[0] != str(gpu.index):
        raise InventoryError(f"{path}.cdi_name: {record['cdi_name']!r} is not {gpu.index}:<n>")
    return MigDevice(
        uuid=record["uuid"], profile=record["profile"], cdi_name=record["cdi_name"], parent=gpu.uuid
    )


def _known_peers_only(gpus: list[Gpu]) -> list[Gpu]:
    """NVLink peers among this inventory's GPUs, both ways (a link has two ends); a peer
    outside it (a GPU hidden from this host's view) is no placement choice."""
    links: dict[str, set[str]] = {g.uuid: set() for g in gpus}
    for gpu in gpus:
        for peer in gpu.nvlink_peers:
            if peer in links:
                links[gpu.uuid].add(peer)
                links[peer].add(gpu.uuid)
    return [replace(g, nvlink_peers=tuple(sorted(links[g.uuid]))) for g in gpus]


def check_unique(gpus: Iterable[Gpu]) -> None:
    """Every alias (index, UUID, PCI address, MIG UUID and CDI name) names one device:
    else one physical GPU could be claimed twice, under two names."""
    seen: dict[str, str] = {}
    for position, gpu in enumerate(gpus):
        path = f"gpus[{position}]"
        names = [("index", str(gpu.index)), ("uuid", gpu.uuid), ("pci_bus_id", gpu.pci_bus_id)]
        for number, mig in enumerate(gpu.mig):
            names += [(f"mig[{number}].uuid", mig.uuid), (f"mig[{number}].cdi_name", mig.cdi_name)]
        for key, alias in names:
            if (other := seen.setdefault(alias, f"{path}.{key}")) != f"{path}.{key}":
                raise InventoryError(f"{path}.{key}: {alias!r} is also {other}")


def from_static_file(path: Path, *, cdi_kind: str = DEFAULT_CDI_KIND) -> GpuInventory:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InventoryError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise InventoryError(f'{path}: expected {{"gpus": [...]}}')
    return GpuInventory(from_records(data["gpus"]), source=f"file:{path}", cdi_kind=cdi_kind)


def from_nvidia_smi_xml(text: str, *, cdi_kind: str = DEFAULT_CDI_KIND) -> GpuInventory:
    """`nvidia-smi -q -x` output. It names no index: GPUs are listed in index order."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InventoryError(f"nvidia-smi XML: {exc}") from exc
    gpus = []
    for index, node in enumerate(root.findall("gpu")[: MAX_GPUS + 1]):
        if index >= MAX_GPUS:
            raise InventoryError(f"nvidia-smi: more than {MAX_GPUS} GPUs")
        minor = (node.findtext("minor_number") or "").strip()
        pci = node.findtext("pci/pci_bus_id") or node.get("id") or ""
        try:
            gpu = _gpu(
                index,
                (node.findtext("uuid") or "").strip(),
                (node.findtext("product_name") or "").strip(),
                pci,
                int(minor) if minor.isdigit() else None,
            )
        except ValueError as exc:
            raise InventoryError(f"nvidia-smi GPU {index}: {exc}") from exc
        # MIG mode, though this source names no instance: the GPU is not to be had whole.
        if (node.findtext("mig_mode/current_mig") or "").strip() == "Enabled":
            log.warning("GPU %d is in MIG mode: nvidia-smi names no instances to claim", index)
            gpu = replace(gpu, mig_enabled=True)
        gpus.append(gpu)
    check_unique(gpus)
    return GpuInventory(tuple(gpus), source="nvidia-smi", cdi_kind=cdi_kind)


def from_nvml(*, cdi_kind: str = DEFAULT_CDI_KIND) -> GpuInventory:
    from sandfleet.workers.gpu.nvml import read_nvml  # noqa: PLC0415 - needs this module

    return GpuInventory(from_records(read_nvml()), source="nvml", cdi_kind=cdi_kind)


def from_nvidia_smi(
    *, cdi_kind: str = DEFAULT_CDI_KIND, binary: str = "nvidia-smi"
) -> GpuInventory:
    path = shutil.which(binary)
    if path is None:
        raise SourceAbsent("nvidia-smi is not on PATH")
    inventory = from_nvidia_smi_xml(_run(path, "-q", "-x"), cdi_kind=cdi_kind)
    from sandfleet.workers.gpu.topo_matrix import (  # noqa: PLC0415 - needs this module
        parse_topo_matrix,
        with_matrix,
    )

    try:
        matrix = parse_topo_matrix(_run(path, "topo", "-m"))
    except InventoryError as exc:  # identities without topology still serve
        log.warning("GPU topology unknown: %s", exc)
        return inventory
    return with_matrix(inventory, matrix)


def _run(binary: str, *args: str) -> str:
    try:
        result = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise InventoryError(f"nvidia-smi {' '.join(args)}: {exc}") from exc
    return result.stdout


def discover(static_file: Path | None, *, cdi_kind: str = DEFAULT_CDI_KIND) -> GpuInventory:
    """The host's inventory from the first source that answers."""
    if static_file is not None:
        return from_static_file(static_file, cdi_kind=cdi_kind)
    for source in (from_nvml, from_nvidia_smi):
        try:
            return source(cdi_kind=cdi_kind)
        except SourceAbsent as exc:
            log.debug("GPU inventory: %s", exc)
        except InventoryError as exc:  # there, but failing: the next source knows less
            log.warning("GPU inventory: %s; trying the next source", exc)
    return GpuInventory((), source="none", cdi_kind=cdi_kind)
