"""MIG instances on the MIG fixture: aliases, conflicts with their GPU, placement by
profile, the request's validation; the claims file before MIG; NVML's records."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from sandfleet.common.errors import RequestInvalid
from sandfleet.common.models import MIG_PROFILE_PATTERN, GpuRequirement, field_errors
from sandfleet.workers.gpu import inventory as inventory_module
from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import GpuBusy, GpuClaimStore, NotEnoughGpus
from sandfleet.workers.gpu.inventory import (
    GpuInventory,
    InventoryError,
    MigDevice,
    SourceAbsent,
    UnknownGpu,
    discover,
    from_records,
    from_static_file,
)
from sandfleet.workers.gpu.nvml import read_nvml, records_from
from sandfleet.workers.gpu.placement import Topology, place
from tests.support.gpus import MIG_DIR, fixture_records

MIG = from_static_file(MIG_DIR / "inventory.json")
GPU0, GPU1, GPU2 = (gpu.uuid for gpu in MIG)
SLICE_A, SLICE_B = (m.uuid for m in MIG.gpus[0].mig)  # 3g.40gb, 0:0 and 0:1
SMALL_A, SMALL_B, BIG = (m.uuid for m in MIG.gpus[2].mig)  # 1g.10gb twice, 3g.40gb


def allocator(tmp_path: Path, *, mig: bool = True) -> GpuAllocator:
    return GpuAllocator(
        MIG,
        GpuClaimStore(tmp_path),
        driver="docker",
        worker_id="w",
        device_id=lambda g: f"cdi={g.index}",
        mig_device_id=(lambda m: f"cdi={m.cdi_name}") if mig else None,
    )


def test_mig_aliases_resolve_to_the_instance() -> None:
    for alias in ("nvidia.com/gpu=0:1", f"nvidia.com/gpu={SLICE_B}", SLICE_B, "0:1"):
        assert MIG.resolve_claimable(alias).uuid == SLICE_B, alias
    assert MIG.resolve_claimable("nvidia.com/gpu=0").uuid == GPU0
    with pytest.raises(UnknownGpu, match="MIG instance"):
        MIG.resolve(SLICE_A)  # not a whole GPU
    with pytest.raises(UnknownGpu):
        MIG.resolve_claimable("nvidia.com/gpu=1:0")  # GPU1 has no MIG


def test_a_whole_gpu_and_its_instances_conflict_two_instances_do_not(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)

    def claim(job: str, ids: list[str], parents: list[str]) -> None:
        store.claim(job_id=job, gpus=ids, devices=ids, parents=parents, driver="d", worker_id="w")

    claim("a", [SLICE_A], [GPU0])
    claim("b", [SLICE_B], [GPU0])  # another instance of the same GPU: no conflict
    with pytest.raises(GpuBusy) as busy:
        claim("whole", [GPU0], [GPU0])
    assert busy.value.holders[GPU0] in {"a", "b"}
    with pytest.raises(GpuBusy):
        claim("again", [SLICE_A], [GPU0])  # the same instance
    assert store.free([GPU0, GPU1, GPU2]) == [GPU1, GPU2]
    claim("whole2", [GPU2], [GPU2])
    with pytest.raises(GpuBusy) as busy:
        claim("small", [SMALL_A], [GPU2])  # its GPU is held whole
    assert busy.value.holders == {SMALL_A: "whole2"}
    store.release("a", driver="d")
    store.release("b", driver="d")
    claim("whole", [GPU0], [GPU0])


async def test_count_only_requests_never_take_a_slice_nor_a_gpu_in_mig_mode(
    tmp_path: Path,
) -> None:
    gpus = allocator(tmp_path)
    assert gpus.capacity(gpus.request([], 1, path="p", host="h")) == 1  # only GPU1 is whole
    claim = await gpus.claim("a", gpus.request([], 1, path="p", host="h"))
    assert claim.gpus == (GPU1,)
    with pytest.raises(NotEnoughGpus):
        await gpus.claim("b", gpus.request([], 1, path="p", host="h"))


async def test_profile_requests_take_slices_packed_onto_one_gpu(tmp_path: Path) -> None:
    gpus = allocator(tmp_path)
    big = gpus.request([], 1, path="p", host="h", mig_profile="3g.40gb")
    assert gpus.capacity(big) == 3
    # GPU0 has 2 instances free, GPU2 3: the first goes to GPU0, and so does the next
    first, why = await gpus.claim_placed("a", big)
    assert (first.gpus, first.devices, why.why) == ((SLICE_A,), ("cdi=0:0",), "mig")
    assert first.parents == (GPU0,)
    assert (await gpus.claim("b", big)).gpus == (SLICE_B,)
    assert (await gpus.claim("c", big)).gpus == (BIG,)
    with pytest.raises(NotEnoughGpus) as none:
        await gpus.claim("d", big)
    assert none.value.holders == {SLICE_A: "a", SLICE_B: "b", BIG: "c"}
    assert str(none.value).startswith("1 MIG instance(s) wanted, 0 free")
    # GPU2's small instances are still free: its 3g.40gb instance does not hold them
    small = await gpus.claim("e", gpus.request([], 2, path="p", host="h", mig_profile="1g.10gb"))
    assert set(small.gpus) == {SMALL_A, SMALL_B}
    assert await gpus.free_count() == 1  # GPU1; GPU0 and GPU2 are held in part


async def test_exact_mig_ids_are_claimed_with_their_parent(tmp_path: Path) -> None:
    gpus = allocator(tmp_path)
    claim = await gpus.claim("a", gpus.request(["nvidia.com/gpu=0:1"], 1, path="p", host="h"))
    assert (claim.gpus, claim.devices, claim.parents) == (
        (SLICE_B,),
        ("nvidia.com/gpu=0:1",),
        (GPU0,),
    )
    with pytest.raises(GpuBusy):
        await gpus.claim("b", gpus.request(["nvidia.com/gpu=0"], 1, path="p", host="h"))
    await gpus.claim("c", gpus.request([f"nvidia.com/gpu={SLICE_A}"], 1, path="p", host="h"))
    assert await gpus.free_count() == 1  # GPU1: GPU0 is held in part, GPU2 is in MIG mode


def test_requests_naming_what_cannot_be_had_are_field_errors(tmp_path: Path) -> None:
    gpus = allocator(tmp_path)
    with pytest.raises(RequestInvalid) as both:
        gpus.request(["nvidia.com/gpu=0", "nvidia.com/gpu=0:0"], 2, path="ids", host="h")
    assert both.value.errors[0].field == "ids"
    assert "whole GPU and one of its MIG instances" in both.value.errors[0].message
    with pytest.raises(RequestInvalid) as unknown:
        gpus.request([], 1, path="ids", host="h", mig_profile="7g.80gb")
    assert unknown.value.errors[0].field == "resource_requirements.gpu.mig_profile"
    with pytest.raises(RequestInvalid) as wrong:
        gpus.request(["nvidia.com/gpu=2:0"], 1, path="ids", host="h", mig_profile="3g.40gb")
    assert wrong.value.errors[0].field == "ids.0"
    no_mig = allocator(tmp_path, mig=False)
    with pytest.raises(RequestInvalid, match="cannot pass MIG instances"):
        no_mig.request(["nvidia.com/gpu=0:0"], 1, path="ids", host="h")
    with pytest.raises(RequestInvalid, match="cannot pass MIG instances"):
        no_mig.request([], 1, path="ids", host="h", mig_profile="3g.40gb")


def test_claims_files_before_mig_read_and_write_as_before(tmp_path: Path) -> None:
    record = {
        "job_id": "old", "driver": "docker", "worker_id": "w", "gpus": [GPU1],
        "devices": ["nvidia.com/gpu=1"], "sandbox_id": None,
        "claimed_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    (tmp_path / "gpu").mkdir(mode=0o700)
    path = tmp_path / "gpu" / "claims.json"
    path.write_text(json.dumps({"version": 2, "claims": [record]}))
    path.chmod(0o600)
    store = GpuClaimStore(tmp_path)
    [old] = store.claims()
    assert old.parents == () and old.physical == (GPU1,)
    store.claim(job_id="new", gpus=[GPU2], devices=["d"], driver="docker", worker_id="w")
    written = json.loads(path.read_text())
    assert written["version"] == 2
    assert all("parents" not in r for r in written["claims"])  # whole GPUs: as before
    store.claim(
        job_id="m", gpus=[SLICE_A], devices=["d"], parents=[GPU0], driver="d", worker_id="w"
    )
    [sliced] = [r for r in json.loads(path.read_text())["claims"] if r["job_id"] == "m"]
    assert sliced["parents"] == [GPU0]


def test_static_mig_records_are_checked() -> None:
    base = fixture_records(MIG_DIR)[0]
    instance = base["mig"][0]
    for key, bad in (("uuid", "GPU-x"), ("profile", "3g"), ("cdi_name", "0/1")):
        with pytest.raises(InventoryError, match=rf"gpus\[0\]\.mig\[0\]\.{key}"):
            from_records([{**base, "mig": [{**instance, key: bad}]}])
    with pytest.raises(InventoryError, match=r"mig\[1\]\.cdi_name: .* is also gpus\[0\]\.mig\[0\]"):
        from_records([{**base, "mig": [instance, {**instance, "uuid": "MIG-other"}]}])
    with pytest.raises(InventoryError, match=r"gpus\[0\]\.mig"):
        from_records([{**base, "mig": [instance] * 17}])


@pytest.mark.parametrize("profile", ["3g.40gb", "1g.10gb+me", "1c.3g.40gb", "7g.141gb"])
def test_mig_profiles_accepted(profile: str) -> None:
    assert GpuRequirement(count=1, mig_profile=profile).mig_profile == profile


@pytest.mark.parametrize("profile", ["", "3g", "3G.40GB", "3g.40gb;rm", "0g.1gb", "x" * 40])
def test_mig_profiles_refused(profile: str) -> None:
    with pytest.raises(ValidationError):
        GpuRequirement(count=1, mig_profile=profile)


def test_a_mig_profile_needs_a_count_and_the_error_names_count() -> None:
    with pytest.raises(ValidationError, match="needs count") as missing:
        GpuRequirement(mig_profile="3g.40gb")
    [error] = field_errors(missing.value, prefix="resource_requirements.gpu")
    assert error.field == "resource_requirements.gpu.count"


def test_the_two_profile_patterns_agree() -> None:
    assert MIG_PROFILE_PATTERN == inventory_module.MIG_PROFILE_PATTERN


class FakeNvml:
    """pynvml's calls used by `records_from`, answering for two NVLinked GPUs and a
    third in MIG mode behind an NVSwitch-less PCIe slot."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        a, b, c = "00000000:07:00.0", "00000000:0F:00.0", "00000000:87:00.0"
        self.gpus: list[dict[str, Any]] = [
            {"uuid": "GPU-a", "pci": a, "links": {0: b}},
            {"uuid": "GPU-b", "pci": b, "links": {3: a}},
            {"uuid": "GPU-c", "pci": c, "links": {}, "mig": ["MIG-c0", None, "MIG-c2"]},
        ]
        self.broken_uuids: set[str] = set()  # MIG instances whose UUID query fails

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: Any) -> bytes:
        if handle["uuid"] in self.broken_uuids:
            raise self.NVMLError("Unknown Error")
        return str(handle["uuid"]).encode()

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return "NVIDIA H100 80GB HBM3 MIG 3g.40gb" if "parent" in handle else "NVIDIA H100"

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        return SimpleNamespace(busId=handle["pci"].encode())

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        raise self.NVMLError("not supported")

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        if link not in handle["links"]:
            raise self.NVMLError("invalid argument")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: Any, link: int) -> Any:
        return SimpleNamespace(busId=handle["links"][link])

    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int]:
        return (1, 1) if "mig" in handle else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        return len(handle["mig"])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, position: int) -> Any:
        uuid = handle["mig"][position]
        if uuid is None:
            raise self.NVMLError("not found")
        return {"uuid": uuid, "parent": handle["uuid"]}


def test_nvml_records_carry_numa_nvlink_and_mig(tmp_path: Path) -> None:
    # NUMA from sysfs (this fake has no nvmlDeviceGetNumaNodeId)
    for gpu, node in (("0000:07:00.0", "0"), ("0000:0f:00.0", "0"), ("0000:87:00.0", "-1")):
        (tmp_path / gpu).mkdir()
        (tmp_path / gpu / "numa_node").write_text(node + "\n")
    records = records_from(FakeNvml(), sysfs=tmp_path)
    gpus = from_records(records)
    assert [g.numa_node for g in gpus] == [0, 0, None]
    assert [g.nvlink_peers for g in gpus] == [("GPU-b",), ("GPU-a",), ()]
    assert [g.minor for g in gpus] == [None, None, None]
    assert gpus[2].mig == (
        MigDevice(uuid="MIG-c0", profile="3g.40gb", cdi_name="2:0", parent="GPU-c"),
        MigDevice(uuid="MIG-c2", profile="3g.40gb", cdi_name="2:2", parent="GPU-c"),
    )
    assert re.fullmatch(MIG_PROFILE_PATTERN, gpus[2].mig[0].profile)


def test_nvml_skips_an_instance_it_cannot_read_and_keeps_its_gpu_in_mig_mode() -> None:
    nvml = FakeNvml()
    nvml.broken_uuids.add("MIG-c0")
    nvml.gpus[0]["links"][1] = "garbled"  # a remote end NVML gives no PCI address for
    gpus = from_records(records_from(nvml))  # before: NVMLError / ValueError, no NVML source
    assert [m.uuid for m in gpus[2].mig] == ["MIG-c2"]
    assert gpus[2].mig_enabled
    assert [g.nvlink_peers for g in gpus] == [("GPU-b",), ("GPU-a",), ()]


def test_a_gpu_in_mig_mode_with_no_instance_is_never_handed_out_whole(tmp_path: Path) -> None:
    nvml = FakeNvml()
    nvml.gpus[2]["mig"] = [None, None]  # MIG on, no instance created yet
    gpus = from_records(records_from(nvml))
    assert gpus[2].mig == () and gpus[2].mig_enabled
    inventory = GpuInventory(gpus, source="nvml")
    topology = Topology.of(inventory)
    assert topology.whole == ("GPU-a", "GPU-b")
    assert place(topology, {"GPU-c"}, 1) is None
    store = GpuClaimStore(tmp_path)
    gpus_of = GpuAllocator(inventory, store, driver="d", worker_id="w", device_id=lambda g: "x")
    request = gpus_of.request([], 3, path="p", host="h")
    assert gpus_of.capacity(request) == 2


class FakePynvml(FakeNvml):
    """The pynvml module as `read_nvml` imports it, its nvmlInit failing as told."""

    class NVMLError_LibraryNotFound(FakeNvml.NVMLError):
        pass

    def __init__(self, init_error: Exception | None) -> None:
        super().__init__()
        self.init_error = init_error

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None: ...


def test_nvml_that_is_there_but_fails_is_a_warning_not_a_quiet_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi either
    no_driver = FakePynvml(FakePynvml.NVMLError_LibraryNotFound("no libnvidia-ml"))
    monkeypatch.setitem(sys.modules, "pynvml", no_driver)
    with pytest.raises(SourceAbsent):
        read_nvml()
    with caplog.at_level(logging.DEBUG, logger="sandfleet.workers.gpu.inventory"):
        assert discover(None).source == "none"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(FakeNvml.NVMLError("Unknown Error")))
    with caplog.at_level(logging.DEBUG, logger="sandfleet.workers.gpu.inventory"):
        assert discover(None).source == "none"
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "NVML: Unknown Error" in warning.getMessage()
    working = FakePynvml(None)
    monkeypatch.setitem(sys.modules, "pynvml", working)
    assert [gpu.uuid for gpu in discover(None)] == ["GPU-a", "GPU-b", "GPU-c"]
