"""`nvidia-smi topo -m`: the GPU topology where NVML is absent.

The matrix names each pair's link: `X` (itself), `NV<n>` (n bonded NVLinks), or a PCIe
path (`PIX`, `PXB`, `PHB`, `NODE`, `SYS`); its `NUMA Affinity` column names each GPU's
node (`N/A` where unknown). Cells are separated by tabs; the legend below is ignored.
A link named otherwise (a newer driver's word) is taken for no NVLink, with a warning;
a link one row names and the other does not is taken both ways.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, replace

from sandfleet.workers.gpu.inventory import MAX_NUMA_NODE, GpuInventory, InventoryError

log = logging.getLogger(__name__)

_GPU = re.compile(r"GPU([0-9]{1,3})")  # matched whole (fullmatch), as is _NVLINK
_NVLINK = re.compile(r"NV[0-9]{1,3}")
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
    while columns and not columns[-1]:  # a header ending in a tab: no column there
        columns.pop()
    rows = {}
    for number, line in enumerate(lines[header_at + 1 :], start=header_at + 2):
        cells = [cell.strip() for cell in line.split("\t")]
        match = _GPU.fullmatch(cells[0])
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
        peer = _GPU.fullmatch(column)
        if peer is None:
            continue
        if _NVLINK.fullmatch(cell):
            peers.add(int(peer[1]))
        elif cell not in _PCIE:  # not an NVLink this parser knows: placed as PCIe
            log.warning(
                "nvidia-smi topo -m line %d: %s is %r; taken for no NVLink",
                number,
                column,
                cell[:32],
            )
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
    links: dict[int, set[int]] = defaultdict(set)
    for index, named in rows.items():
        for peer in named.nvlink_peers:
            if index in uuid_of and peer in uuid_of and peer != index:
                links[index].add(peer)
                links[peer].add(index)  # a link has two ends, whichever row named it
    gpus = []
    for gpu in inventory:
        row = rows.get(gpu.index)
        if row is None and gpu.index not in links:
            gpus.append(gpu)  # the matrix says nothing of it
            continue
        peers = tuple(sorted(uuid_of[p] for p in links[gpu.index]))
        numa = gpu.numa_node if row is None else row.numa_node
        gpus.append(replace(gpu, numa_node=numa, nvlink_peers=peers))
    return replace(inventory, gpus=tuple(gpus))
