"""The metrics server and the worker's metrics, without a broker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from sandfleet.common.events import Phase
from sandfleet.common.metrics import MetricsServer, MetricsUnavailable
from sandfleet.workers.gpu.claims import GpuClaimStore
from sandfleet.workers.gpu.inventory import GpuInventory, from_records
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.metrics import JobMetrics, WorkerMetrics
from sandfleet.workers.slots import Slots
from tests.support.gpus import FOUR_GPUS, FOUR_UUIDS, MIG_DIR, fixture_records
from tests.support.metrics import scraped


class Health:
    def __init__(self) -> None:
        self.ok = False


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Health, CollectorRegistry]]:
    registry, health = CollectorRegistry(), Health()
    Counter("sandfleet_things", "things", registry=registry).inc(2)
    server = MetricsServer(registry, healthy=lambda: health.ok)
    await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}", health, registry
    finally:
        await server.stop()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def test_healthz_follows_the_process_health(
    served: tuple[str, Health, CollectorRegistry],
) -> None:
    url, health, _ = served
    assert (await get(f"{url}/healthz"))[0] == 503
    health.ok = True
    assert (await get(f"{url}/healthz"))[0] == 200


async def test_metrics_serve_the_registry_given_not_the_global_one(
    served: tuple[str, Health, CollectorRegistry],
) -> None:
    url, _, _ = served
    status, text = await get(f"{url}/metrics")
    names = {family.name for family in text_string_to_metric_families(text)}
    assert status == 200
    assert names <= {"sandfleet_things", "sandfleet_things_created"}
    assert "sandfleet_things" in names  # and no process_* or python_* of the global registry


async def test_a_port_in_use_is_a_misconfiguration_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(CollectorRegistry(), healthy=lambda: True)
        with pytest.raises(MetricsUnavailable) as caught:
            await server.start("127.0.0.1", port)
    assert str(caught.value).startswith("SANDFLEET_METRICS_ADDRESS/SANDFLEET_METRICS_PORT")
    assert f"cannot listen on 127.0.0.1:{port}: " in str(caught.value)


@pytest.mark.parametrize("command", [["gateway"], ["worker", "--driver", "inmemory"]])
def test_the_commands_exit_78_in_one_line_when_the_port_is_taken(
    command: list[str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {
            **os.environ,
            "SANDFLEET_ALLOW_UNSIGNED_JOBS": "1",
            "SANDFLEET_STATE_DIR": str(tmp_path / "state"),
            "SANDFLEET_JOURNAL_DIR": str(tmp_path / "journal"),
        }
        ran = subprocess.run(
            [sys.executable, "-m", "sandfleet", *command, "--metrics-port", port],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ran.returncode == 78, ran.stderr
    assert ran.stderr.count("\n") == 1
    assert ran.stderr.startswith("sandfleet: SANDFLEET_METRICS_ADDRESS/SANDFLEET_METRICS_PORT")


def test_gpus_by_state_and_who_holds_them(tmp_path: Path) -> None:
    claims = GpuClaimStore(tmp_path)
    inventory = GpuInventory(from_records(FOUR_GPUS["gpus"]), source="test")
    claims.claim(
        job_id="j1", gpus=FOUR_UUIDS[:2], devices=FOUR_UUIDS[:2], driver="d", worker_id="w"
    )
    slots = Slots(3)
    slots.start_now()
    samples = scraped(WorkerMetrics(slots, inventory, claims).registry)
    assert samples[("sandfleet_gpus", ("state=free",))] == 2
    assert samples[("sandfleet_gpus", ("state=held",))] == 2
    assert samples[("sandfleet_gpus", ("state=unhealthy",))] == 0
    holders = {labels for name, labels in samples if name == "sandfleet_gpu_holder_info"}
    assert holders == {(f"gpu={uuid}", "job=j1") for uuid in FOUR_UUIDS[:2]}
    assert samples[("sandfleet_worker_slots", ("state=running",))] == 1
    assert samples[("sandfleet_worker_slots", ("state=free",))] == 2
    claims.mark_unhealthy(FOUR_UUIDS[0], "Xid 79")  # held, and unhealthy
    claims.drain(FOUR_UUIDS[3], reason="fan swap", by="ops")
    samples = scraped(WorkerMetrics(slots, inventory, claims).registry)
    assert samples[("sandfleet_gpus", ("state=free",))] == 1  # only GPU 2 is claimable
    assert samples[("sandfleet_gpus", ("state=held",))] == 2
    assert samples[("sandfleet_gpus", ("state=unhealthy",))] == 1
    assert samples[("sandfleet_gpus", ("state=drained",))] == 1


def test_gpus_in_mig_mode_are_not_free_whole(tmp_path: Path) -> None:
    # GPU0 and GPU2 carry MIG instances; a GPU in MIG mode with none known counts too
    records = fixture_records(MIG_DIR)
    records.append({**FOUR_GPUS["gpus"][3], "index": 3, "mig_enabled": True})
    inventory = GpuInventory(from_records(records), source="test")
    claims = GpuClaimStore(tmp_path)
    slice_a = inventory.gpus[0].mig[0]
    claims.claim(
        job_id="m", gpus=[slice_a.uuid], devices=["d"], parents=[slice_a.parent],
        driver="d", worker_id="w",
    )  # fmt: skip
    samples = scraped(WorkerMetrics(Slots(1), inventory, claims).registry)
    assert samples[("sandfleet_gpus", ("state=free",))] == 1  # GPU1, the only whole one
    assert samples[("sandfleet_gpus", ("state=mig",))] == 2  # GPU2 and GPU3: none held
    assert samples[("sandfleet_gpus", ("state=held",))] == 1  # GPU0, in part


def test_only_terminal_events_are_counted_and_timed() -> None:
    registry = CollectorRegistry()
    metrics = JobMetrics(registry)
    identity = WorkerIdentity(worker_id="w", driver="inmemory", host="h1")
    metrics.observe(identity.event("a", Phase.RUNNING, "Started"))
    ended = identity.event("a", Phase.SUCCEEDED, "Completed").model_copy(
        update={"timings": {"queued": 0.2, "running": 42.0}}
    )
    metrics.observe(ended)
    samples = scraped(registry)
    jobs = [
        (labels, value)
        for (name, labels), value in samples.items()
        if name == "sandfleet_jobs_total"
    ]
    assert jobs == [(("driver=inmemory", "host=h1", "phase=succeeded"), 1.0)]
    running = ("driver=inmemory", "stage=running")
    assert samples[("sandfleet_job_stage_seconds_count", running)] == 1
    assert samples[("sandfleet_job_stage_seconds_sum", running)] == 42.0
    assert (
        "sandfleet_job_stage_seconds_count",
        ("driver=inmemory", "stage=gpu_wait"),
    ) not in samples
