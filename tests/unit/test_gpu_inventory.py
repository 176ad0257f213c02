from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandfleet.workers.gpu.inventory import (
    MAX_GPUS,
    GpuInventory,
    InventoryError,
    UnknownGpu,
    discover,
    from_nvidia_smi_xml,
    from_records,
    from_static_file,
    normalize_pci_address,
)
from sandfleet.workers.gpu.placement import Topology
from tests.support.gpus import (
    FOUR_GPUS,
    FOUR_UUIDS,
    H200_DIR,
    H200_UUID,
    MIG_DIR,
    fixture_records,
    write_inventory,
)


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
    with pytest.raises(InventoryError, match=r"gpus\[1\]\.uuid: .* is also gpus\[0\]\.uuid"):
        from_static_file(write_inventory(tmp_path / "c.json", dup))


def test_discover_without_any_source_finds_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    inventory = discover(None)
    assert inventory.source in {"none", "nvml"}
    if inventory.source == "none":
        assert len(inventory) == 0


def test_mig_mode_is_read_from_every_source() -> None:
    gpus = FOUR_GPUS["gpus"]
    static = from_records([{**gpus[0], "mig_enabled": True}, gpus[1]])
    assert [g.mig_enabled for g in static] == [True, False]
    assert Topology.of(GpuInventory(static, source="file")).whole == (FOUR_UUIDS[1],)
    assert from_records(fixture_records(MIG_DIR))[0].mig_enabled  # implied by its instances
    assert not nvml_fixture().gpus[0].mig_enabled
    xml = (H200_DIR / "nvidia-smi-q.xml").read_text()
    enabled = xml.replace("<current_mig>Disabled", "<current_mig>Enabled", 1)
    [gpu] = from_nvidia_smi_xml(enabled).gpus
    assert gpu.mig_enabled and gpu.mig == ()
    assert Topology.of(from_nvidia_smi_xml(enabled)).whole == ()
    with pytest.raises(InventoryError, match=r"gpus\[0\]\.mig_enabled"):
        from_records([{**gpus[0], "mig_enabled": "yes"}])
    mig_gpu = fixture_records(MIG_DIR)[0]
    with pytest.raises(InventoryError, match=r"gpus\[0\]\.mig_enabled"):
        from_records([{**mig_gpu, "mig_enabled": False}])


def test_one_alias_never_names_two_devices() -> None:
    gpu0, gpu1 = fixture_records(MIG_DIR)[:2]
    instance = gpu0["mig"][0]
    # an instance of GPU0 named as GPU1's would alias "1:0"
    with pytest.raises(InventoryError, match=r"gpus\[0\]\.mig\[0\]\.cdi_name: '1:0' is not 0:<n>"):
        from_records([{**gpu0, "mig": [{**instance, "cdi_name": "1:0"}]}, gpu1])
    # a GPU whose UUID is another GPU's MIG instance's
    with pytest.raises(
        InventoryError, match=r"gpus\[1\]\.uuid: .* is also gpus\[0\]\.mig\[0\]\.uuid"
    ):
        from_records([gpu0, {**gpu1, "uuid": instance["uuid"]}])
    # two GPUs' instances with one UUID
    with pytest.raises(InventoryError, match=r"gpus\[1\]\.mig\[0\]\.uuid: .* is also gpus\[0\]"):
        from_records([gpu0, {**gpu1, "mig": [{**instance, "cdi_name": "1:0"}]}])


@pytest.mark.parametrize(
    ("key", "value"),
    [("uuid", "MIG-abc\n"), ("cdi_name", "0:1\n"), ("profile", "3g.40gb\n")],
)
def test_patterns_match_whole_values(key: str, value: str) -> None:
    gpu = fixture_records(MIG_DIR)[0]
    with pytest.raises(InventoryError, match=rf"gpus\[0\]\.mig\[0\]\.{key}"):
        from_records([{**gpu, "mig": [{**gpu["mig"][0], key: value}]}])


def test_gpu_identities_are_bounded(tmp_path: Path) -> None:
    gpu = FOUR_GPUS["gpus"][0]
    with pytest.raises(InventoryError, match=r"gpus\[0\]: uuid"):
        from_records([{**gpu, "uuid": "GPU-" + "a" * 125}])  # 129: no claimed event carries it
    assert from_records([{**gpu, "uuid": "GPU-" + "a" * 124}])[0].uuid.endswith("a")
    with pytest.raises(InventoryError, match=r"gpus\[0\]: uuid"):
        from_records([{**gpu, "uuid": "GPU-1\n"}])
    with pytest.raises(InventoryError, match=r"gpus\[0\]: name"):
        from_records([{**gpu, "name": "x" * 257}])
    with pytest.raises(InventoryError, match=r"gpus\[0\]: name"):
        from_records([{**gpu, "name": "H100\x1b[2J"}])
    xml = (H200_DIR / "nvidia-smi-q.xml").read_text()
    with pytest.raises(InventoryError, match=r"nvidia-smi GPU 0: .*PCI"):  # was a ValueError
        from_nvidia_smi_xml(xml.replace("00000000:00:06.0", "bogus"))


def test_a_static_file_has_at_most_max_gpus(tmp_path: Path) -> None:
    def gpus(count: int) -> dict[str, list[dict[str, object]]]:
        return {
            "gpus": [
                {"index": i, "uuid": f"GPU-{i}", "pci_bus_id": f"0000:{i // 32:02x}:{i % 32:02x}.0"}
                for i in range(count)
            ]
        }

    assert len(from_static_file(write_inventory(tmp_path / "max.json", gpus(MAX_GPUS)))) == 256
    with pytest.raises(InventoryError, match=f"more than {MAX_GPUS} GPUs"):
        from_static_file(write_inventory(tmp_path / "over.json", gpus(MAX_GPUS + 1)))
