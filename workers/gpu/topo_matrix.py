"""`nvidia-smi topo -m`: the GPU topology where NVML is absent.

The matrix names each pair's link: `X` (itself), `NV<n>` (n bonded NVLinks), or a PCIe
path (`PIX`, `PXB`, `PHB`, `NODE`, `SYS`); its `NUMA Affinity` column names each GPU's
node (`N/A` where unknown). Cells are separated by tabs; the legend below is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from sandfleet.workers.gpu.inventory import MAX_NUMA_NODE, GpuInventory, InventoryError

_GPU = re.compile(r"^GPU([0-9]{1,3})$")
_NVLINK = re.compile(r"^NV[0-9]{1,3}$")
_PCIE = frozenset({"X", "PIX", "PXB", "PHB", "NODE", "SYS", "SOC", "N/A"})
# Some drivers underline the header (ESC[4m … ESC[0m), even into a pipe.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_MATRIX_CHARS = 1 << 20


@dataclass(frozen=True)
class TopoRow:
    index: int
    numa_node: int | None
    nvlink_peers: frozenset[int]  # indices


def parse_topo_matrix(text: str) -> dict[int, TopoRow]:
    """Each GPU's row by index; InventoryError naming the line for anything else."""
    if len(text) > MAX_MATRIX_CHARS:
        raise InventoryError(f"nvidia-smi topo -m: over {MAX_MATRIX_CHARS} characters")
    lines = _ANSI.sub("", text).splitlines()
    header_at = next((n for n, line in enumerate(lines) if _is_header(line)), None)
    if header_at is None:
        raise InventoryError("nvidia-smi topo -m: no header line naming GPU0")
    columns = [cell.strip() for cell in lines[header_at].split("\t")]
    rows = {}
    for number, line in enumerate(lines[header_at + 1 :], start=header_at + 2):
        cells = [cell.strip() for cell in line.split("\t")]
        match = _GPU.match(cells[0])
        if match is None:
            continue  # NICs, blank lines, the legend
        if len(cells) < len(columns):
            raise InventoryError(f"nvidia-smi topo -m line {number}: {len(cells)} cells")
        rows[int(match[1])] = _row(int(match[1]), dict(zip(columns, cells, strict=False)), number)
    return rows


def _is_header(line: str) -> bool:
    return "GPU0" in (cell.strip() for cell in line.split("\t"))


def _row(index: int, cells: dict[str, str], number: int) -> TopoRow:
    peers = set()
    for column, cell in cells.items():
        peer = _GPU.match(column)
        if peer is None:
            continue
        if _NVLINK.match(cell):
            peers.add(int(peer[1]))
        elif cell not in _PCIE:
            raise InventoryError(f"nvidia-smi topo -m line {number}: {column} is {cell!r}")
    return TopoRow(index, _numa(cells.get("NUMA Affinity", ""), number), frozenset(peers))


def _numa(cell: str, number: int) -> int | None:
    if cell in {"", "N/A"}:
        return None
    if cell.isdigit() and int(cell) <= MAX_NUMA_NODE:
        return int(cell)
    if re.fullmatch(r"[0-9,-]{1,64}", cell):
        return None  # a range ("0-1"): no single node is near
    raise InventoryError(f"nvidia-smi topo -m line {number}: NUMA Affinity {cell!r}")


def with_matrix(inventory: GpuInventory, rows: dict[int, TopoRow]) -> GpuInventory:
    """The inventory with each GPU's NUMA node and NVLink peers from the matrix."""
    uuid_of = {gpu.index: gpu.uuid for gpu in inventory}
    gpus = []
    for gpu in inventory:
        row = rows.get(gpu.index)
        if row is None:
            gpus.append(gpu)
            continue
        peers = sorted(uuid_of[p] for p in row.nvlink_peers if p in uuid_of and p != gpu.index)
        gpus.append(replace(gpu, numa_node=row.numa_node, nvlink_peers=tuple(peers)))
    return replace(inventory, gpus=tuple(gpus))
