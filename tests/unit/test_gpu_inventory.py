from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandfleet.workers.gpu.inventory import (
    GpuInventory,
    InventoryError,
    UnknownGpu,
    discover,
    from_nvidia_smi_xml,
    from_records,
    from_static_file,
    normalize_pci_address,
)
from tests.support.gpus import FOUR_GPUS, FOUR_UUIDS, H200_DIR, H200_UUID, write_inventory


def nvml_fixture() -> GpuInventory:
    records = json.loads((H200_DIR / "nvml.json").read_text())["gpus"]
    return GpuInventory(from_records(records), source="nvml")


def test_nvml_and_nvidia_smi_readings_give_the_same_identity() -> None:
    nvml = nvml_fixture()
    smi = from_nvidia_smi_xml((H200_DIR / "nvidia-smi-q.xml").read_text())
    assert nvml.gpus == smi.gpus
    [gpu] = smi.gpus
    assert gpu.uuid == H200_UUID
    assert gpu.index == 0 and gpu.minor == 0
    assert gpu.name == "NVIDIA H200"
    assert gpu.pci_bus_id == "0000:00:06.0"  # NVML's 00000000:00:06.0, normalised


def test_every_alias_resolves_to_the_one_physical_gpu() -> None:
    inventory = nvml_fixture()
    for alias in (
        "0",
        H200_UUID,
        "nvidia.com/gpu=0",
        f"nvidia.com/gpu={H200_UUID}",
        "0000:00:06.0",
        "00000000:00:06.0",
        "00:06.0",
    ):
        assert inventory.resolve(alias).uuid == H200_UUID, alias
    with pytest.raises(UnknownGpu):
        inventory.resolve("nvidia.com/gpu=1")
    with pytest.raises(UnknownGpu):
        inventory.resolve("0000:00:07.0")


def test_cdi_kind_is_configurable() -> None:
    inventory = GpuInventory(nvml_fixture().gpus, source="x", cdi_kind="test.sandfleet/gpu")
    assert inventory.resolve("test.sandfleet/gpu=0").uuid == H200_UUID
    with pytest.raises(UnknownGpu):
        inventory.resolve("nvidia.com/gpu=0")


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("00000000:2D:00.0", "0000:2d:00.0"),
        ("0000:2d:00.1", "0000:2d:00.1"),
        ("2d:00.0", "0000:2d:00.0"),
    ],
)
def test_pci_addresses_normalise(raw: str, normal: str) -> None:
    assert normalize_pci_address(raw) == normal


@pytest.mark.parametrize("bad", ["0000:2d:00", "0000:2d:00.8", "zz:00.0", "100000000:00:06.0"])
def test_bad_pci_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_pci_address(bad)


def test_static_inventory_with_four_gpus(tmp_path: Path) -> None:
    inventory = from_static_file(write_inventory(tmp_path / "gpus.json"))
    assert [g.index for g in inventory] == [0, 1, 2, 3]
    assert inventory.resolve("0000:2c:00.0").index == 2
    assert inventory.resolve(FOUR_UUIDS[3]).index == 3
    assert discover(tmp_path / "gpus.json").source.startswith("file:")


def test_static_inventory_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="expected"):
        from_static_file(write_inventory(tmp_path / "a.json", {"devices": []}))
    with pytest.raises(InventoryError, match=r"gpus\[0\]"):
        from_static_file(write_inventory(tmp_path / "b.json", {"gpus": [{"index": 0}]}))
    dup = {
        "gpus": [
            FOUR_GPUS["gpus"][0],
            {**FOUR_GPUS["gpus"][1], "uuid": FOUR_GPUS["gpus"][0]["uuid"]},
        ]
    }
    with pytest.raises(InventoryError, match="share a uuid"):
        from_static_file(write_inventory(tmp_path / "c.json", dup))


def test_discover_without_any_source_finds_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    inventory = discover(None)
    assert inventory.source in {"none", "nvml"}
    if inventory.source == "none":
        assert len(inventory) == 0
