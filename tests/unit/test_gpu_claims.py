"""The host-local claim store: atomic multi-GPU claims, aliases, leases, no fd leaks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.errors import RequestInvalid
from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import (
    UNKNOWN_DRIVER,
    GpuBusy,
    GpuClaimStore,
    NotEnoughGpus,
    WorkerLease,
    worker_alive,
)
from sandfleet.workers.gpu.inventory import GpuInventory, from_static_file
from tests.support.gpus import write_inventory

UUIDS = [f"GPU-{i}" for i in range(4)]


def claim(store: GpuClaimStore, job: str, gpus: list[str], worker: str = "w1") -> None:
    store.claim(job_id=job, gpus=gpus, devices=gpus, driver="docker", worker_id=worker)


def test_multi_gpu_claims_are_all_or_nothing(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    claim(store, "a", UUIDS[:2])
    with pytest.raises(GpuBusy) as busy:
        claim(store, "b", [UUIDS[1], UUIDS[2]])
    assert busy.value.holders == {UUIDS[1]: "a"}
    assert [c.job_id for c in store.claims()] == ["a"]  # b took nothing, not even GPU-2
    claim(store, "c", [UUIDS[2], UUIDS[3]])
    assert store.free(UUIDS) == []


def test_claim_any_takes_free_ones_or_none(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    claim(store, "a", [UUIDS[0]])
    got = store.claim_any(
        job_id="b",
        count=2,
        candidates=UUIDS,
        device_for=lambda u: f"dev-{u}",
        driver="docker",
        worker_id="w",
    )
    assert got.gpus == (UUIDS[1], UUIDS[2])
    assert got.devices == (f"dev-{UUIDS[1]}", f"dev-{UUIDS[2]}")
    with pytest.raises(NotEnoughGpus):
        store.claim_any(
            job_id="c", count=2, candidates=UUIDS, device_for=str, driver="docker", worker_id="w"
        )
    assert store.free(UUIDS) == [UUIDS[3]]


def test_a_claim_records_job_driver_worker_sandbox_and_time(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    claim(store, "a", [UUIDS[0]], worker="w7")
    store.attach_sandbox("a", "sbx-1", driver="docker")
    [record] = GpuClaimStore(tmp_path).claims()  # another process's view: from the file
    assert (record.job_id, record.driver, record.worker_id, record.sandbox_id) == (
        "a",
        "docker",
        "w7",
        "sbx-1",
    )
    assert record.claimed_at.endswith("+00:00")


def test_a_redelivered_job_gets_its_claim_back(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    claim(store, "a", [UUIDS[0]], worker="old")
    claim(store, "a", [UUIDS[0]], worker="new")
    [record] = store.claims()
    assert record.worker_id == "new"
    assert store.release("a", driver="docker") is not None
    assert store.release("a", driver="docker") is None


def test_cdi_name_and_pci_address_of_one_gpu_conflict(tmp_path: Path) -> None:
    inventory = from_static_file(write_inventory(tmp_path / "gpus.json"), cdi_kind="nvidia.com/gpu")
    store = GpuClaimStore(tmp_path / "state")
    docker = GpuAllocator(
        inventory, store, driver="docker", worker_id="d", device_id=lambda g: f"x={g.index}"
    )
    vm = GpuAllocator(
        inventory, store, driver="vm", worker_id="v", device_id=lambda g: g.pci_bus_id
    )
    by_cdi = docker.request(["nvidia.com/gpu=1"], 1, path="p", host="h")
    by_pci = vm.request(["00000000:2b:00.0"], 1, path="p", host="h")  # GPU 1, NVML spelling
    assert by_cdi.exact[0][0] == by_pci.exact[0][0]

    store.claim(
        job_id="docker-job", gpus=[by_cdi.exact[0][0].uuid], devices=["nvidia.com/gpu=1"],
        driver="docker", worker_id="d",
    )  # fmt: skip
    with pytest.raises(GpuBusy) as busy:
        store.claim(
            job_id="vm-job", gpus=[by_pci.exact[0][0].uuid], devices=["0000:2b:00.0"],
            driver="vm", worker_id="v",
        )  # fmt: skip
    assert list(busy.value.holders.values()) == ["docker-job"]


def test_unknown_or_repeated_physical_ids_are_field_errors(tmp_path: Path) -> None:
    inventory = from_static_file(write_inventory(tmp_path / "gpus.json"))
    allocator = GpuAllocator(
        inventory, GpuClaimStore(tmp_path), driver="docker", worker_id="w", device_id=str
    )
    path = "template.driver_config.docker.gpu_device_ids"
    with pytest.raises(RequestInvalid) as unknown:
        allocator.request(["nvidia.com/gpu=0", "nvidia.com/gpu=9"], 2, path=path, host="h1")
    assert [(e.field, e.message) for e in unknown.value.errors] == [
        (f"{path}.1", "no GPU 'nvidia.com/gpu=9' on host h1")
    ]
    uuid0 = inventory.resolve("0").uuid
    with pytest.raises(RequestInvalid) as same:
        allocator.request(["nvidia.com/gpu=0", f"nvidia.com/gpu={uuid0}"], 2, path=path, host="h1")
    assert same.value.errors[0].message == "two IDs name the same physical GPU"


def test_reconcile_keeps_live_workers_and_running_sandboxes(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    lease = WorkerLease(tmp_path, "alive")
    lease.acquire()
    try:
        claim(store, "owned-by-live-worker", [UUIDS[0]], worker="alive")
        claim(store, "dead-worker-running-sandbox", [UUIDS[1]], worker="dead")
        claim(store, "dead-worker-sandbox-gone", [UUIDS[2]], worker="dead")
        store.claim(
            job_id="other-driver", gpus=[UUIDS[3]], devices=["x"], driver="vm", worker_id="dead"
        )
        released = store.reconcile(driver="docker", live_jobs={"dead-worker-running-sandbox"})
        assert [c.job_id for c in released] == ["dead-worker-sandbox-gone"]
        assert worker_alive(tmp_path, "alive")
        assert not worker_alive(tmp_path, "dead")
    finally:
        lease.release()
    assert not worker_alive(tmp_path, "alive")
    assert [c.job_id for c in store.reconcile(driver="docker", live_jobs=set())] == [
        "owned-by-live-worker",
        "dead-worker-running-sandbox",
    ]


def test_a_second_process_cannot_take_a_held_lease(tmp_path: Path) -> None:
    lease = WorkerLease(tmp_path, "w")
    lease.acquire()
    try:
        with pytest.raises(RuntimeError, match="held"):
            WorkerLease(tmp_path, "w").acquire()
    finally:
        lease.release()


def test_lock_descriptors_do_not_leak_into_child_processes(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    lease = WorkerLease(tmp_path, "w")
    lease.acquire()
    try:
        with store._transaction():  # the claim lock is held right now
            child = subprocess.run(
                ["sh", "-c", "ls -l /proc/$$/fd"],
                capture_output=True, text=True, check=True, close_fds=False,
            )  # fmt: skip
    finally:
        lease.release()
    assert "claims.lock" not in child.stdout
    assert "w.lock" not in child.stdout


def test_empty_inventory_means_nothing_to_claim(tmp_path: Path) -> None:
    allocator = GpuAllocator(
        GpuInventory((), source="none"),
        GpuClaimStore(tmp_path),
        driver="docker",
        worker_id="w",
        device_id=str,
    )
    assert len(allocator.inventory) == 0


# ---- claims are per (driver, job): Docker and Podman workers share this store ----


def test_the_same_job_id_of_another_driver_never_gets_or_touches_the_claim(
    tmp_path: Path,
) -> None:
    store = GpuClaimStore(tmp_path)
    store.claim(job_id="a", gpus=[UUIDS[0]], devices=["d0"], driver="docker", worker_id="wd")
    with pytest.raises(GpuBusy):  # not handed the Docker job's GPU: two sandboxes, one GPU
        store.claim(job_id="a", gpus=[UUIDS[0]], devices=["p0"], driver="podman", worker_id="wp")
    assert store.adopt("a", driver="podman", worker_id="wp") is None
    store.attach_sandbox("a", "podman-sandbox", driver="podman")
    assert store.release("a", driver="podman") is None
    [docker] = store.claims()
    assert (docker.driver, docker.worker_id, docker.sandbox_id) == ("docker", "wd", None)


def test_two_drivers_jobs_of_one_id_hold_their_own_gpus(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    for n, driver in enumerate(("docker", "podman")):
        store.claim_any(
            job_id="a", count=1, candidates=UUIDS, device_for=str, driver=driver, worker_id=f"w{n}"
        )
    store.attach_sandbox("a", "docker-sandbox", driver="docker")
    held = {claim.driver: (claim.gpus, claim.sandbox_id) for claim in store.claims()}
    assert held == {"docker": ((UUIDS[0],), "docker-sandbox"), "podman": ((UUIDS[1],), None)}
    assert store.reconcile(driver="podman", live_jobs=set())[0].driver == "podman"
    assert [claim.driver for claim in store.claims()] == ["docker"]


async def test_an_allocator_looks_up_adopts_attaches_and_releases_only_its_drivers_claims(
    tmp_path: Path,
) -> None:
    inventory = from_static_file(write_inventory(tmp_path / "gpus.json"), cdi_kind="nvidia.com/gpu")
    store = GpuClaimStore(tmp_path / "state")
    docker, podman = (
        GpuAllocator(inventory, store, driver=name, worker_id=name, device_id=lambda g: g.uuid)
        for name in ("docker", "podman")
    )
    await docker.claim("a", docker.request(["0"], 1, path="ids", host="h1"))
    assert await podman.adopt("a") is None
    await podman.attach("a", "podman-sandbox")
    await podman.release("a")
    [held] = store.claims()
    assert (held.driver, held.worker_id, held.sandbox_id) == ("docker", "docker", None)
    with pytest.raises(GpuBusy):
        await podman.claim("a", podman.request(["0"], 1, path="ids", host="h1"))
    await docker.release("a")
    assert store.claims() == []


def test_a_claim_file_of_the_layout_keyed_by_job_id_is_read_by_each_records_driver(
    tmp_path: Path,
) -> None:
    record = {"worker_id": "gone", "sandbox_id": None, "claimed_at": "2026-11-27T00:00:00+00:00"}
    old = {
        "a": {**record, "job_id": "a", "driver": "docker", "gpus": [UUIDS[0]], "devices": ["d"]},
        # Every version wrote the driver; one without it was edited by hand.
        "b": {**record, "job_id": "b", "gpus": [UUIDS[1]], "devices": ["d"]},
    }
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "claims.json").write_text(json.dumps({"claims": old}))
    store = GpuClaimStore(tmp_path)
    assert {(c.driver, c.job_id) for c in store.claims()} == {
        ("docker", "a"),
        (UNKNOWN_DRIVER, "b"),
    }
    with pytest.raises(NotEnoughGpus):  # the driverless record's GPU stays held too
        store.claim_any(
            job_id="b", count=3, candidates=UUIDS, device_for=str, driver="podman", worker_id="w"
        )
    for driver in ("docker", "podman", "vm"):
        store.reconcile(driver=driver, live_jobs=set())
    assert [(c.driver, c.job_id) for c in store.claims()] == [(UNKNOWN_DRIVER, "b")]
    written = json.loads((tmp_path / "gpu" / "claims.json").read_text())
    assert written["version"] == 2 and [c["job_id"] for c in written["claims"]] == ["b"]


def write_claims(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    (tmp_path / "gpu").mkdir(mode=0o700)
    path = tmp_path / "gpu" / "claims.json"
    path.write_text(json.dumps({"version": 3, "claims": records}))
    path.chmod(0o600)
    return path


RECORD: dict[str, Any] = {
    "driver": "docker",
    "worker_id": "w",
    "sandbox_id": None,
    "claimed_at": "2026-01-01",
}


def test_mig_claims_write_version_3_and_records_from_newer_versions_are_read(
    tmp_path: Path,
) -> None:
    newer = {**RECORD, "job_id": "new", "gpus": [UUIDS[3]], "devices": ["d"], "priority": 9}
    path = write_claims(tmp_path, [newer])
    store = GpuClaimStore(tmp_path)
    [claim_read] = store.claims()  # a key this version does not know is no TypeError
    assert claim_read.gpus == (UUIDS[3],)
    store.claim(
        job_id="m", gpus=["MIG-a"], devices=["d"], parents=[UUIDS[0]], driver="d", worker_id="w"
    )
    assert json.loads(path.read_text())["version"] == 3  # an older worker cannot read it
    store.release("m", driver="d")
    assert json.loads(path.read_text())["version"] == 2  # no MIG claim: as before MIG


def test_a_record_whose_ids_and_parents_differ_holds_all_of_them_whole(tmp_path: Path) -> None:
    damaged = {**RECORD, "job_id": "x", "gpus": ["MIG-a"], "devices": ["d"]}
    write_claims(tmp_path, [{**damaged, "parents": [UUIDS[0], UUIDS[1]]}])
    store = GpuClaimStore(tmp_path)
    for gpus, parents in (([UUIDS[0]], [UUIDS[0]]), (["MIG-b"], [UUIDS[0]]), (["MIG-a"], None)):
        with pytest.raises(GpuBusy):
            store.claim(
                job_id="y", gpus=gpus, devices=gpus, parents=parents, driver="d", worker_id="w"
            )
    assert store.free(UUIDS) == [UUIDS[2], UUIDS[3]]
