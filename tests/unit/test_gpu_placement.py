"""Topology-aware placement on the DGX-like fixture (two 4-GPU NVLink islands, two NUMA
nodes), and the topology's sources: static file, `nvidia-smi topo -m`, NVML."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sandfleet.common.events import GpuPlacement
from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import GpuClaimStore
from sandfleet.workers.gpu.inventory import (
    MAX_GPUS,
    GpuInventory,
    InventoryError,
    from_nvidia_smi_xml,
    from_records,
    from_static_file,
)
from sandfleet.workers.gpu.placement import Placement, Topology, place
from sandfleet.workers.gpu.topo_matrix import parse_topo_matrix, with_matrix
from tests.support.gpus import DGX_DIR, H200_DIR, fixture_records

DGX = from_static_file(DGX_DIR / "inventory.json")
UUID = [gpu.uuid for gpu in DGX]
TOPOLOGY = Topology.of(DGX)


def indices(placement: Placement | None) -> list[int]:
    assert placement is not None
    return [UUID.index(uuid) for uuid in placement.ids]


def free_but(*taken: int) -> set[str]:
    return {uuid for index, uuid in enumerate(UUID) if index not in taken}


def test_the_fixture_has_two_islands_on_two_numa_nodes() -> None:
    assert [len(island) for island in TOPOLOGY.islands] == [4, 4]
    assert TOPOLOGY.complete == (True, True)
    assert [gpu.numa_node for gpu in DGX] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert DGX.gpus[0].nvlink_peers == tuple(sorted(UUID[1:4]))


def test_four_single_jobs_fill_one_island_before_the_other() -> None:
    free = free_but()
    taken = []
    for _ in range(4):
        placement = place(TOPOLOGY, free, 1)
        assert placement is not None and placement.why == "packed"
        free -= set(placement.ids)
        taken += indices(placement)
    assert sorted(taken) == [0, 1, 2, 3]
    # The other island is whole: a 4-GPU job still gets a fully connected set.
    assert indices(place(TOPOLOGY, free, 4)) == [4, 5, 6, 7]


def test_a_single_job_goes_to_the_island_with_fewer_free_gpus() -> None:
    # island A has 2 free (0, 1), island B has 3 free (4, 5, 7)
    free = free_but(2, 3, 6)
    assert indices(place(TOPOLOGY, free, 1)) == [0]
    free = free_but(0, 6, 7)  # A: 1, 2, 3 free; B: 4, 5 free
    assert indices(place(TOPOLOGY, free, 1)) == [4]


def test_a_multi_gpu_job_gets_a_fully_nvlinked_set_in_the_tightest_island() -> None:
    placement = place(TOPOLOGY, free_but(), 2)
    assert placement is not None and placement.why == "nvlink"
    assert indices(placement) == [0, 1]
    # island B has exactly 2 free: the 2-GPU job takes them, A's 4 stay together
    placement = place(TOPOLOGY, free_but(4, 5), 2)
    assert indices(placement) == [6, 7]


def test_without_an_nvlinked_set_it_takes_one_numa_node_then_any() -> None:
    # 3 wanted; each island has 2 free: no NVLink set of 3, no NUMA node with 3
    placement = place(TOPOLOGY, free_but(0, 1, 4, 5), 3)
    assert placement is not None and placement.why == "any"
    assert len(placement.ids) == 3
    # 5 wanted: more than an island; no NUMA node has 5 → any, best connected
    placement = place(TOPOLOGY, free_but(), 5)
    assert placement is not None and placement.why == "any"
    assert sorted(indices(placement))[:4] == [0, 1, 2, 3]


def test_numa_fallback_prefers_the_best_connected_set_on_one_node() -> None:
    # No NVLink at all, NUMA nodes as in the fixture: 2 wanted → one node
    records = [{**r, "nvlink_peers": []} for r in fixture_records(DGX_DIR)]
    flat = Topology.of(GpuInventory(from_records(records), source="test"))
    placement = place(flat, set(flat.whole) - {UUID[0], UUID[1], UUID[2]}, 2)
    assert placement is not None and placement.why == "numa"
    assert indices(placement) == [4, 5]  # node 0 has only GPU3 free
    # Partial NVLink on node 1 (4-5 only): the linked pair wins over 3-4's SYS pair
    records = [{**r, "nvlink_peers": []} for r in fixture_records(DGX_DIR)]
    records[5]["nvlink_peers"] = [UUID[4]]
    linked = Topology.of(GpuInventory(from_records(records), source="test"))
    placement = place(linked, {UUID[3], UUID[6], UUID[4], UUID[5]}, 2)
    assert placement is not None and placement.why == "nvlink"
    assert indices(placement) == [4, 5]


def test_a_non_clique_island_is_searched_for_a_clique() -> None:
    # A ring 0-1-2-3-0: one island, not complete; 2 wanted → a linked pair
    records = fixture_records(DGX_DIR)[:4]
    ring = [[1, 3], [0, 2], [1, 3], [0, 2]]
    records = [{**r, "nvlink_peers": [UUID[p] for p in ring[i]]} for i, r in enumerate(records)]
    topology = Topology.of(GpuInventory(from_records(records), source="test"))
    assert topology.complete == (False,)
    assert indices(place(topology, {UUID[0], UUID[2], UUID[3]}, 2)) == [0, 3]
    assert place(topology, {UUID[0], UUID[2]}, 2) == Placement((UUID[0], UUID[2]), "numa")


def test_too_few_free_is_none() -> None:
    assert place(TOPOLOGY, free_but(0, 1, 2, 3, 4, 5, 6), 2) is None
    assert place(TOPOLOGY, set(), 1) is None


def test_topo_matrix_gives_the_static_files_topology() -> None:
    rows = parse_topo_matrix((DGX_DIR / "nvidia-smi-topo-m.txt").read_text())
    assert sorted(rows) == list(range(8))
    assert rows[0].nvlink_peers == {1, 2, 3} and rows[5].nvlink_peers == {4, 6, 7}
    assert rows[3].numa_node == 0 and rows[4].numa_node == 1
    bare = GpuInventory(
        tuple(replace(gpu, numa_node=None, nvlink_peers=()) for gpu in DGX), source="nvidia-smi"
    )
    assert bare.gpus[0].nvlink_peers == ()
    assert with_matrix(bare, rows).gpus == DGX.gpus


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("no matrix here\n", "no header"),
        ("\tGPU0\tNUMA Affinity\nGPU0\t X \tbanana\n", "NUMA Affinity 'banana'"),
        ("\tGPU0\tGPU1\tNUMA Affinity\nGPU0\t X \n", "line 2: 2 cells"),
    ],
)
def test_topo_matrix_errors_name_the_line(text: str, error: str) -> None:
    with pytest.raises(InventoryError, match=error):
        parse_topo_matrix(text)


def test_topo_matrix_of_a_single_gpu_host() -> None:
    # the header underlined, as some drivers print it even into a pipe
    rows = parse_topo_matrix(
        "\t\x1b[4mGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
        "GPU0\t X \t0-15\t0-1\tN/A\n"
    )
    assert rows[0].nvlink_peers == frozenset() and rows[0].numa_node is None
    smi = from_nvidia_smi_xml((H200_DIR / "nvidia-smi-q.xml").read_text())
    assert with_matrix(smi, rows).gpus[0].numa_node is None


def test_static_topology_is_bounded_and_checked(tmp_path: Path) -> None:
    base = fixture_records(DGX_DIR)[0]
    with pytest.raises(InventoryError, match=r"gpus\[0\]\.numa_node"):
        from_records([{**base, "numa_node": -1}])
    with pytest.raises(InventoryError, match=r"gpus\[0\]\.nvlink_peers"):
        from_records([{**base, "nvlink_peers": ["GPU-x"] * 65}])
    # A peer outside the inventory is dropped; a one-sided link counts both ways.
    a, b = (fixture_records(DGX_DIR)[i] for i in (0, 4))
    gpus = from_records(
        [{**a, "nvlink_peers": ["GPU-elsewhere"]}, {**b, "nvlink_peers": [a["uuid"]]}]
    )
    assert [gpu.nvlink_peers for gpu in gpus] == [(b["uuid"],), (a["uuid"],)]


async def test_the_allocator_places_under_the_lock_and_says_why(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    allocator = GpuAllocator(
        DGX, store, driver="docker", worker_id="w", device_id=lambda g: f"d{g.index}"
    )
    singles = [
        await allocator.claim_placed(f"s{i}", allocator.request([], 1, path="p", host="h"))
        for i in range(3)
    ]
    assert [claim.devices for claim, _ in singles] == [("d0",), ("d1",), ("d2",)]
    assert {placement.why for _, placement in singles} == {"packed"}
    claim, placement = await allocator.claim_placed(
        "pair", allocator.request([], 2, path="p", host="h")
    )
    assert claim.devices == ("d4", "d5") and placement.why == "nvlink"
    again, kept = await allocator.claim_placed("pair", allocator.request([], 2, path="p", host="h"))
    assert again.gpus == claim.gpus and kept.why == "kept"


def test_the_claimed_events_placement_is_bounded() -> None:
    assert GpuPlacement(gpus=UUID[:2], why="nvlink").why == "nvlink"
    with pytest.raises(ValidationError):
        GpuPlacement(gpus=["GPU-x"] * 65, why="any")
    with pytest.raises(ValidationError):
        GpuPlacement(gpus=["x" * 129], why="any")
    with pytest.raises(ValidationError):
        GpuPlacement(gpus=[], why="because")


def linked_gpus(count: int, *, unlinked: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """`count` GPUs every two of which are NVLinked, but for the pair `unlinked`."""
    uuids = [f"GPU-{i:04d}" for i in range(count)]
    return [
        {
            "index": i,
            "uuid": uuids[i],
            "pci_bus_id": f"0000:{i // 32:02x}:{i % 32:02x}.0",
            "nvlink_peers": [u for j, u in enumerate(uuids) if {i, j} != set(unlinked or ())],
        }
        for i in range(count)
    ]


def test_an_obvious_clique_in_a_big_island_is_found() -> None:
    # 64 GPUs, all linked but 0-1: the first 2000 subsets in order all hold 0 and 1
    topology = Topology.of(GpuInventory(from_records(linked_gpus(64, unlinked=(0, 1))), "t"))
    assert topology.complete == (False,)
    placement = place(topology, set(topology.whole), 16)
    assert placement is not None and placement.why == "nvlink"
    assert len(set(placement.ids)) == 16 and not {"GPU-0000", "GPU-0001"} <= set(placement.ids)


def test_the_largest_inventory_reads_and_places_quickly() -> None:
    # MAX_GPUS GPUs in NVLink islands of 64 (the most peers a GPU may name), one link
    # missing in each, so no island is complete; generous bounds: a shared CI machine
    one_island = linked_gpus(64, unlinked=(0, 1))
    records = []
    for record in linked_gpus(MAX_GPUS):
        island, index = divmod(record["index"], 64)
        peers = [f"GPU-{island * 64 + int(p[4:]):04d}" for p in one_island[index]["nvlink_peers"]]
        records.append({**record, "nvlink_peers": peers})
    started = time.monotonic()
    topology = Topology.of(GpuInventory(from_records(records), source="t"))
    for count in (1, 8, 63, 64, 65):
        assert place(topology, set(topology.whole), count) is not None
    assert time.monotonic() - started < 10


def test_topo_matrix_with_a_header_ending_in_a_tab() -> None:
    rows = parse_topo_matrix(
        "\tGPU0\tGPU1\tNUMA Affinity\t\nGPU0\t X \tNV4\t0\nGPU1\tNV4\t X \t0\n"
    )
    assert rows[0].nvlink_peers == {1} and rows[1].numa_node == 0


def test_topo_matrix_unknown_links_are_no_nvlink_and_the_rest_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = "\tGPU0\tGPU1\tGPU2\nGPU0\t X \tNV4\tC2C\nGPU1\tNV4\t X \tPIX\nGPU2\tC2C\tPIX\t X \n"
    with caplog.at_level(logging.WARNING):
        rows = parse_topo_matrix(text)
    assert [rows[i].nvlink_peers for i in range(3)] == [{1}, {0}, set()]
    assert "GPU2 is 'C2C'; taken for no NVLink" in caplog.text


def test_topo_matrix_links_count_both_ways() -> None:
    # GPU0's row names NV4 to GPU1; GPU1's row says SYS (a torn or odd reading)
    rows = parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \tNV4\nGPU1\tSYS\t X \n")
    bare = GpuInventory(tuple(replace(g, nvlink_peers=()) for g in DGX.gpus[:2]), source="smi")
    linked = with_matrix(bare, rows)
    assert [g.nvlink_peers for g in linked] == [(UUID[1],), (UUID[0],)]
