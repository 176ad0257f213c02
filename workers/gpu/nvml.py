"""Inventory records read through NVML (nvidia-ml-py): identity, NUMA node, NVLink peers
and MIG instances, in the static file's shape (`inventory.from_records` reads them).

Each query beyond identity is optional: a driver or GPU that does not answer one gives
a record without that part, never an error; a MIG instance or NVLink NVML cannot describe
is skipped (with a warning), its GPU kept (in MIG mode still, so never claimed whole).
`records_from` takes the pynvml module as an argument, so its logic runs in tests
against a fake.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from sandfleet.workers.gpu.inventory import (
    MAX_MIG_PER_GPU,
    MIG_PROFILE_PATTERN,
    MIG_UUID,
    InventoryError,
    SourceAbsent,
    normalize_pci_address,
)

log = logging.getLogger(__name__)

SYSFS_PCI = Path("/sys/bus/pci/devices")
NVLINK_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS
NVLINK_DEVICE_TYPE_SWITCH = 1  # NVML_NVLINK_DEVICE_TYPE_SWITCH
# nvmlInit's failures that say this host has no NVIDIA driver: no source, not a broken one.
_NO_DRIVER = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")
_MIG_PROFILE_IN_NAME = re.compile(r"\bMIG ((?:[1-9]c\.)?[1-9]g\.[0-9]+gb(?:\+[a-z]+)?)")


def read_nvml() -> list[dict[str, Any]]:
    """Records of the host's GPUs; InventoryError when NVML is unavailable."""
    try:
        import pynvml  # noqa: PLC0415 - optional native extra
    except ImportError as exc:
        raise SourceAbsent("nvidia-ml-py is not installed (pip install 'sandfleet[nvml]')") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        absent = tuple(getattr(pynvml, name) for name in _NO_DRIVER if hasattr(pynvml, name))
        raise (SourceAbsent if isinstance(exc, absent) else InventoryError)(f"NVML: {exc}") from exc
    try:
        return records_from(pynvml)
    except (pynvml.NVMLError, ValueError) as exc:  # ValueError: a malformed answer
        raise InventoryError(f"NVML: {exc}") from exc
    finally:
        pynvml.nvmlShutdown()


def records_from(nvml: Any, sysfs: Path = SYSFS_PCI) -> list[dict[str, Any]]:
    """Every GPU's record, its NVLink peers named by UUID."""
    records, links = [], []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        record = {
            "index": index,
            "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "pci_bus_id": _text(nvml.nvmlDeviceGetPciInfo(handle).busId),
            "minor": _optional(nvml, "nvmlDeviceGetMinorNumber", handle),
        }
        record["numa_node"] = _numa_node(nvml, handle, record["pci_bus_id"], sysfs)
        record["mig_enabled"], record["mig"] = _mig_instances(nvml, handle, index)
        records.append(record)
        links.append(_nvlinks(nvml, handle))
    _name_peers(records, links)
    return records


def _optional(nvml: Any, query: str, *args: Any) -> Any:
    """NVML's answer to `query(*args)`, or None when this driver, GPU or nvidia-ml-py
    version does not support it."""
    call = getattr(nvml, query, None)
    if call is None:
        return None
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _numa_node(nvml: Any, handle: Any, pci: str, sysfs: Path) -> int | None:
    node = _optional(nvml, "nvmlDeviceGetNumaNodeId", handle)
    if isinstance(node, int) and node >= 0:
        return node
    try:  # the kernel's word, for drivers without the NVML call
        node = int((sysfs / normalize_pci_address(pci) / "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None  # -1: the platform has no NUMA


def _nvlinks(nvml: Any, handle: Any) -> tuple[set[str], bool]:
    """The PCI addresses at the far end of each active link, and whether any reaches an
    NVSwitch (then every GPU on the switch fabric is a peer)."""
    remote, switched = set(), False
    for link in range(NVLINK_MAX_LINKS):
        if _optional(nvml, "nvmlDeviceGetNvLinkState", handle, link) != 1:
            continue
        kind = _optional(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
        if kind == NVLINK_DEVICE_TYPE_SWITCH:
            switched = True
            continue
        info = _optional(nvml, "nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
        if info is None:
            continue
        try:
            remote.add(normalize_pci_address(_text(info.busId)))
        except ValueError as exc:  # one link NVML garbles is no reason to lose the GPU
            log.warning("NVLink %d: remote end unknown (%s); link skipped", link, exc)
    return remote, switched


def _name_peers(records: list[dict[str, Any]], links: list[tuple[set[str], bool]]) -> None:
    by_pci = {normalize_pci_address(r["pci_bus_id"]): r["uuid"] for r in records}
    on_switch = [r["uuid"] for r, (_, switched) in zip(records, links, strict=True) if switched]
    for record, (remote, switched) in zip(records, links, strict=True):
        peers = {by_pci[pci] for pci in remote if pci in by_pci}
        if switched:
            peers.update(on_switch)
        peers.discard(record["uuid"])
        record["nvlink_peers"] = sorted(peers)


def _mig_instances(nvml: Any, handle: Any, index: int) -> tuple[bool, list[dict[str, str]]]:
    """Whether the GPU is in MIG mode, and the instances NVML describes."""
    mode = _optional(nvml, "nvmlDeviceGetMigMode", handle)
    if not mode or mode[0] != 1:  # (current, pending); 1: enabled
        return False, []
    found = []
    slots = _optional(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle) or 0
    for position in range(min(slots, MAX_MIG_PER_GPU)):
        mig = _optional(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", handle, position)
        if mig is None:
            continue  # no instance in this slot
        try:
            found.append(_mig_instance(nvml, mig, f"{index}:{position}"))  # nvidia-ctk's name
        except (nvml.NVMLError, ValueError) as exc:  # one instance, not the whole source
            # not claimable by profile (or at all), so not claimed: say so
            log.warning("GPU %d: MIG instance %d skipped: %s", index, position, exc)
    return True, found


def _mig_instance(nvml: Any, mig: Any, cdi_name: str) -> dict[str, str]:
    name = _text(nvml.nvmlDeviceGetName(mig))
    profile = _MIG_PROFILE_IN_NAME.search(name)
    if profile is None or not re.fullmatch(MIG_PROFILE_PATTERN, profile[1]):
        raise ValueError(f"{name!r} names no profile")
    uuid = _text(nvml.nvmlDeviceGetUUID(mig))
    if not MIG_UUID.fullmatch(uuid):
        raise ValueError(f"UUID {uuid!r} does not match {MIG_UUID.pattern}")
    return {"uuid": uuid, "profile": profile[1], "cdi_name": cdi_name}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
