"""Topology-aware placement and MIG instances through real Docker and Podman workers,
with a CDI spec of their own (kind test.sandfleet/placement: whole GPUs 0-2 and the MIG
fixture's instances 0:0, 0:1, 2:0, 2:1, 2:2): each job sees, from inside its container,
the devices placed for it."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client, EventStream
from sandfleet.workers.gpu.claims import GpuClaimStore
from tests.support import submit_and_wait, until_phase, until_terminal
from tests.support.cli import run_sandfleet, sandfleet_env
from tests.support.gpus import DGX_DIR, MIG_DIR, fixture_records, write_inventory
from tests.support.runtimes import CDI_DIR, ROOT, TEST_IMAGE, WorkerFactory

pytestmark = pytest.mark.integration

SPEC = ROOT / "tests" / "fixtures" / "cdi" / "sandfleet-test-placement.json"
KIND = "test.sandfleet/placement"
PROBE = "ls /dev | grep sandfleet-; env | grep SANDFLEET_TEST_ | sort"
MIG_UUIDS = {m["cdi_name"]: m["uuid"] for g in fixture_records(MIG_DIR) for m in g.get("mig", [])}


@pytest.fixture(scope="module")
def placement_cdi_spec() -> Iterator[Path]:
    """This module's CDI spec, installed where Docker and Podman look for specs."""
    CDI_DIR.mkdir(parents=True, exist_ok=True)
    installed = CDI_DIR / SPEC.name
    shutil.copyfile(SPEC, installed)
    yield installed
    installed.unlink(missing_ok=True)


@pytest.fixture(params=["docker", "podman"])
def worker(request: pytest.FixtureRequest, placement_cdi_spec: Path) -> tuple[str, WorkerFactory]:
    name = request.param
    request.getfixturevalue("podman_image" if name == "podman" else "test_image")
    return name, request.getfixturevalue(f"{name}_worker")


def job(
    driver: str, command: str, gpu: dict[str, Any], ids: list[str] | None = None
) -> dict[str, Any]:
    template: dict[str, Any] = {"image": TEST_IMAGE, "command": ["sh", "-c", command]}
    if ids:
        template["driver_config"] = {driver: {"gpu_device_ids": ids}}
    return {
        "job_id": f"pl-{uuid.uuid4().hex[:10]}",
        "driver": driver,
        "resource_requirements": {"gpu": gpu},
        "template": template,
    }


async def until_event(
    stream: EventStream, wanted: Callable[[Event], bool], *, timeout: float = 30
) -> Event:
    async with asyncio.timeout(timeout):
        async for event in stream:
            if wanted(event):
                return event
    raise AssertionError("event stream ended")


def claimed(events: list[Event]) -> Event:
    [event] = [e for e in events if e.phase is Phase.CLAIMED]
    return event


def linked_pair_inventory(path: Path) -> tuple[Path, list[str]]:
    """Three GPUs of the DGX fixture: 0 and 1 NVLinked, 2 alone, one NUMA node."""
    records = [{**r, "numa_node": 0, "nvlink_peers": []} for r in fixture_records(DGX_DIR)[:3]]
    records[0]["nvlink_peers"] = [records[1]["uuid"]]
    return write_inventory(path, {"gpus": records}), [r["uuid"] for r in records]


async def test_single_gpu_jobs_are_packed_and_pairs_get_an_nvlinked_set(
    settings: Settings, client: Client, worker: tuple[str, WorkerFactory], tmp_path: Path
) -> None:
    driver, start = worker
    inventory, uuids = linked_pair_inventory(tmp_path / "gpus.json")
    async with start(gpu_inventory=inventory, cdi_kind=KIND):
        # One GPU: the lone GPU2, keeping the linked pair whole (the first free is GPU0)
        single = await submit_and_wait(client, job(driver, PROBE, {"count": 1}))
        pair = await submit_and_wait(client, job(driver, PROBE, {"count": 2}))
    assert single[-1].phase is Phase.SUCCEEDED, single[-1].message
    assert single[-1].output == "sandfleet-gpu2\nSANDFLEET_TEST_GPU_2=present\n"
    placement = claimed(single).placement
    assert placement is not None and (placement.gpus, placement.why) == ([uuids[2]], "packed")
    assert "(packed)" in claimed(single).message
    assert pair[-1].phase is Phase.SUCCEEDED, pair[-1].message
    assert pair[-1].output == (
        "sandfleet-gpu0\nsandfleet-gpu1\nSANDFLEET_TEST_GPU_0=present\nSANDFLEET_TEST_GPU_1=present\n"
    )
    placement = claimed(pair).placement
    assert placement is not None and (placement.gpus, placement.why) == (uuids[:2], "nvlink")
    assert GpuClaimStore(settings.state_dir).claims() == []


async def test_mig_instances_share_their_gpu_which_is_not_given_whole_meanwhile(
    settings: Settings, client: Client, worker: tuple[str, WorkerFactory]
) -> None:
    driver, start = worker
    gpu0 = fixture_records(MIG_DIR)[0]["uuid"]
    holder = job(driver, "echo up; sleep 120", {"count": 1}, [f"{KIND}=0:0"])
    by_profile = job(driver, PROBE, {"count": 1, "mig_profile": "3g.40gb"})
    whole = job(driver, PROBE, {"count": 1}, [f"{KIND}=0"])
    inventory = MIG_DIR / "inventory.json"
    async with (
        start(gpu_inventory=inventory, cdi_kind=KIND, slots=3, gpu_retry_seconds=0.3),
        client.events() as stream,
    ):
        assert (await client.submit(holder)).accepted
        await until_phase(stream, holder["job_id"], Phase.RUNNING)
        # Another instance of GPU0 runs beside it (packed: GPU0 has 1 free, GPU2 3)
        events = await submit_and_wait(client, by_profile)
        # The whole GPU0 waits while its instance 0:0 is held...
        assert (await client.submit(whole)).accepted
        # (its first retries may find by_profile's claim not yet released: wait on the
        # holder)
        blocker = f"{gpu0} held by job {holder['job_id']}"
        await until_event(stream, lambda e: e.job_id == whole["job_id"] and e.message == blocker)
        await client.cancel(holder["job_id"])
        # ...and runs once it is released.
        done = await until_terminal(stream, whole["job_id"], timeout=60)
    assert events[-1].phase is Phase.SUCCEEDED, events[-1].message
    assert events[-1].output == "sandfleet-mig0_1\nSANDFLEET_TEST_MIG_0_1=present\n"
    assert claimed(events).gpus == [f"{KIND}=0:1"]
    placement = claimed(events).placement
    assert placement is not None and (placement.gpus, placement.why) == ([MIG_UUIDS["0:1"]], "mig")
    assert done[-1].phase is Phase.SUCCEEDED, done[-1].message
    assert done[-1].output == "sandfleet-gpu0\nSANDFLEET_TEST_GPU_0=present\n"
    assert GpuClaimStore(settings.state_dir).claims() == []


async def test_the_gpus_command_shows_mig_instances_and_their_holders(
    settings: Settings,
) -> None:
    store = GpuClaimStore(settings.state_dir)
    gpu0 = fixture_records(MIG_DIR)[0]["uuid"]
    store.claim(job_id="slice", gpus=[MIG_UUIDS["0:1"]], devices=["d"], parents=[gpu0],
                driver="docker", worker_id="w")  # fmt: skip
    env = sandfleet_env(
        settings,
        SANDFLEET_GPU_INVENTORY=str(MIG_DIR / "inventory.json"),
        SANDFLEET_STATE_DIR=str(settings.state_dir),
        SANDFLEET_JOURNAL_DIR=str(settings.journal_dir),
        COLUMNS="250",
    )
    ran = await run_sandfleet(env, "gpus", "--json")
    assert ran.returncode == 0, ran.stderr
    [gpu0_row, _, gpu2_row] = json.loads(ran.stdout)["gpus"]
    assert gpu0_row["claim"] is None and gpu0_row["numa_node"] == 0
    assert [(m["cdi_name"], m["claim"] and m["claim"]["job_id"]) for m in gpu0_row["mig"]] == [
        ("0:0", None),
        ("0:1", "slice"),
    ]
    assert [m["profile"] for m in gpu2_row["mig"]] == ["1g.10gb", "1g.10gb", "3g.40gb"]
    table = await run_sandfleet(env, "gpus")
    assert table.returncode == 0, table.stderr
    [gpu0_line] = [line for line in table.stdout.splitlines() if gpu0 in line]
    assert "MIG instances held" in gpu0_line
    [slice_line] = [line for line in table.stdout.splitlines() if MIG_UUIDS["0:1"] in line]
    assert "slice" in slice_line and "MIG 3g.40gb" in slice_line
