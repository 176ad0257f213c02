"""The host's GPUs: one identity (UUID) per physical GPU, and its aliases.

Sources, in order: a static file (`SANDFLEET_GPU_INVENTORY`, which replaces discovery),
NVML (the optional `nvml` extra), `nvidia-smi -q -x`, else no GPUs.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CDI_KIND = "nvidia.com/gpu"

# DDDD:BB:DD.F, with NVML's 8-digit domain (00000000:00:06.0) as the same address
_PCI = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<device>[0-9a-fA-F]{2})\.(?P<function>[0-7])$"
)


class InventoryError(Exception):
    """An inventory source could not be read."""


def normalize_pci_address(address: str) -> str:
    """`00000000:00:06.0`, `0000:00:06.0` and `00:06.0` → `0000:00:06.0`."""
    match = _PCI.match(address.strip())
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
class Gpu:
    index: int
    uuid: str
    name: str
    pci_bus_id: str  # normalised, DDDD:BB:DD.F
    minor: int | None = None

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

    def resolve(self, device_id: str) -> Gpu:
        """The physical GPU behind any alias: CDI name, UUID, index or PCI address."""
        candidates = {device_id}
        with contextlib.suppress(ValueError):
            candidates.add(normalize_pci_address(device_id))
        for gpu in self.gpus:
            if candidates & gpu.aliases(self.cdi_kind):
                return gpu
        raise UnknownGpu(device_id)


def _gpu(index: int, uuid: str, name: str, pci: str, minor: int | None) -> Gpu:
    return Gpu(
        index=index, uuid=uuid, name=name, pci_bus_id=normalize_pci_address(pci), minor=minor
    )


def from_records(records: Iterable[dict[str, Any]]) -> tuple[Gpu, ...]:
    """GPUs from the static-file / nvml.json shape: index, uuid, name, pci_bus_id[, minor]."""
    gpus = []
    for position, record in enumerate(records):
        try:
            gpus.append(
                _gpu(
                    int(record["index"]),
                    str(record["uuid"]),
                    str(record.get("name", "")),
                    str(record["pci_bus_id"]),
                    None if record.get("minor") is None else int(record["minor"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InventoryError(f"gpus[{position}]: {exc}") from exc
    _check_unique(gpus)
    return tuple(sorted(gpus, key=lambda g: g.index))


def _check_unique(gpus: list[Gpu]) -> None:
    for attribute in ("index", "uuid", "pci_bus_id"):
        values = [getattr(g, attribute) for g in gpus]
        if len(values) != len(set(values)):
            raise InventoryError(f"two GPUs share a {attribute}")


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
    for index, node in enumerate(root.findall("gpu")):
        minor = (node.findtext("minor_number") or "").strip()
        pci = node.findtext("pci/pci_bus_id") or node.get("id") or ""
        gpus.append(
            _gpu(
                index,
                (node.findtext("uuid") or "").strip(),
                (node.findtext("product_name") or "").strip(),
                pci,
                int(minor) if minor.isdigit() else None,
            )
        )
    _check_unique(gpus)
    return GpuInventory(tuple(gpus), source="nvidia-smi", cdi_kind=cdi_kind)


def read_nvml() -> list[dict[str, Any]]:
    """Records read through NVML (nvidia-ml-py); InventoryError when NVML is unavailable."""
    try:
        import pynvml  # noqa: PLC0415 - optional native extra
    except ImportError as exc:
        raise InventoryError(
            "nvidia-ml-py is not installed (pip install 'sandfleet[nvml]')"
        ) from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise InventoryError(f"NVML: {exc}") from exc
    try:
        records = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pci = pynvml.nvmlDeviceGetPciInfo(handle)
            try:
                minor: int | None = pynvml.nvmlDeviceGetMinorNumber(handle)
            except pynvml.NVMLError:
                minor = None
            records.append({
                "index": index,
                "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
                "pci_bus_id": _text(pci.busId),
                "minor": minor,
            })  # fmt: skip
        return records
    except pynvml.NVMLError as exc:
        raise InventoryError(f"NVML: {exc}") from exc
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def from_nvml(*, cdi_kind: str = DEFAULT_CDI_KIND) -> GpuInventory:
    return GpuInventory(from_records(read_nvml()), source="nvml", cdi_kind=cdi_kind)


def from_nvidia_smi(
    *, cdi_kind: str = DEFAULT_CDI_KIND, binary: str = "nvidia-smi"
) -> GpuInventory:
    path = shutil.which(binary)
    if path is None:
        raise InventoryError("nvidia-smi is not on PATH")
    try:
        result = subprocess.run(
            [path, "-q", "-x"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise InventoryError(f"nvidia-smi -q -x: {exc}") from exc
    return from_nvidia_smi_xml(result.stdout, cdi_kind=cdi_kind)


def discover(static_file: Path | None, *, cdi_kind: str = DEFAULT_CDI_KIND) -> GpuInventory:
    """The host's inventory from the first source that answers."""
    if static_file is not None:
        return from_static_file(static_file, cdi_kind=cdi_kind)
    for source in (from_nvml, from_nvidia_smi):
        try:
            return source(cdi_kind=cdi_kind)
        except InventoryError as exc:
            log.debug("GPU inventory: %s", exc)
    return GpuInventory((), source="none", cdi_kind=cdi_kind)
